"""`meki-gguf quantize` (meki_gguf/quantize.py over the patched llama-quantize): the table's type
independent of the backbone's, the table left alone by the backbone's default rules, one-line
errors for types the table cannot have, and an output that appears complete or not at all."""
from __future__ import annotations

import fcntl
import re
import sys
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from meki_gguf.checkpoint import Checkpoint
from meki_gguf.cli import main
from meki_gguf.errors import MekiError
from meki_gguf.model import MekiConfig, init_random
from meki_gguf.quantize import (COLD, ROW_ORDER, SCALE, TABLE, TABLE_TYPES, file_scales, llama_tool, method_of,
                                methods_for, quantize, rewrite, table_tiers)
from meki_gguf.tokenizer import tiny_tokenizer_dir
from meki_gguf.write import write_gguf

TINY = MekiConfig(vocab_size=512, n_layer=2, d_model=64, d_mem=32, d_ff=128, n_head=4, n_kv_head=2, head_dim=16)
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny MeKi GGUF with an f32 table and an f16 backbone (what one quantizes from)."""
    d = tmp_path_factory.mktemp("q")
    ckpt = Checkpoint(TINY, init_random(TINY).state_dict(), "hf", d)
    return write_gguf(ckpt, d / "src.gguf", outtype="f16", table_type="f32",
                      tokenizer=tiny_tokenizer_dir(d / "tok"), progress=False)


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def table_f32(path: Path) -> np.ndarray:
    """The table as the graph uses it: dequantized (gguf-py, numpy), times the scales if any."""
    r = gguf.GGUFReader(path)
    t = next(x for x in r.tensors if x.name == TABLE)
    n = int(t.shape[0])
    rows = dequantize(t).reshape(-1, n)
    s = file_scales(r)
    return rows if s is None else rows * s


def dequantize(t: gguf.ReaderTensor) -> np.ndarray:
    """f32 values of a tensor, from its bytes in numpy: gguf-py's dequantizers, and for q1_0 and
    q2_0 (which gguf-py has none of) ggml's block layouts read here."""
    if t.tensor_type not in (Q.Q1_0, Q.Q2_0):
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    qk, bits = (128, 1) if t.tensor_type == Q.Q1_0 else (64, 2)
    raw = np.asarray(t.data, np.uint8).reshape(-1, 2 + qk * bits // 8)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)                   # [n_blocks, 1]
    q = np.unpackbits(raw[:, 2:], axis=1, bitorder="little").reshape(raw.shape[0], qk, bits)
    q = (q * (1 << np.arange(bits))).sum(-1)                                    # little-endian fields
    # q1_0: bit set = +d, else -d; q2_0: 00 = -1, 01 = 0, 10 = +1, 11 = +2 (times d)
    return (d * (2.0 * q - 1) if bits == 1 else d * (q - 1.0)).astype(np.float32)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cli_error(*args, needle: str) -> str:
    r = cli(*args)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    return lines[0]


@pytest.mark.parametrize("table_type, tol", [("f16", 1e-3), ("q8_0", 1e-2), ("q4_0", 0.2)])
def test_table_type_round_trip(tmp_path, src, table_type, tol):
    out = tmp_path / "out.gguf"
    r = cli("quantize", src, out, "--table-type", table_type)
    assert r.exit_code == 0, r.output
    a, b = tensors(src), tensors(out)
    assert b[TABLE].tensor_type == Q[table_type.upper()]
    ref, got = table_f32(src), table_f32(out)
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    # the backbone is copied as it is, byte for byte; a scaled table brings its scales
    scales = {SCALE.format(il) for il in range(TINY.n_layer)}
    assert set(b) == set(a) | (scales if method_of(table_type) == "scaled" else set())
    for name in set(a) - {TABLE}:
        assert a[name].tensor_type == b[name].tensor_type and np.array_equal(a[name].data, b[name].data), name
    kv = gguf.GGUFReader(out).fields
    assert kv["general.architecture"].contents() == "meki" and kv["meki.embedding_length_per_layer_input"].contents() == 32


def test_backbone_and_table_types_are_independent(tmp_path, src):
    out = tmp_path / "out.gguf"
    assert cli("quantize", src, out, "--table-type", "q4_0", "--type", "q8_0").exit_code == 0
    t = tensors(out)
    assert t[TABLE].tensor_type == Q.Q4_0
    assert t["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0 and t["blk.1.meki_gate.weight"].tensor_type == Q.Q8_0
    assert t["blk.0.meki_post_norm.weight"].tensor_type == Q.F32


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_llama_quantize_leaves_the_table_alone(tmp_path, src, ftype):
    """The patched tool's default rules keep the table's type; only --tensor-type names it."""
    out = tmp_path / "out.gguf"
    subprocess.run([llama_tool("llama-quantize"), src, out, ftype], check=True, capture_output=True)
    a, b = tensors(src), tensors(out)
    assert b[TABLE].tensor_type == Q.F32 and np.array_equal(a[TABLE].data, b[TABLE].data)
    assert b["blk.0.attn_q.weight"].tensor_type != Q.F16        # the backbone was quantized


@pytest.mark.parametrize("table_type, needle", [
    ("q4_k", "blocks of 256 values do not divide the memory width m = 32"),
    ("iq2_xs", "blocks of 256 values do not divide the memory width m = 32"),
    ("q8_1", "not a type the table can have"),
    ("int4", "not a type the table can have"),
])
def test_bad_table_type(tmp_path, src, table_type, needle):
    out = tmp_path / "out.gguf"
    cli_error("quantize", src, out, "--table-type", table_type, needle=needle)
    assert list(tmp_path.iterdir()) == []


def test_bad_backbone_type_and_input(tmp_path, src):
    cli_error("quantize", src, tmp_path / "o.gguf", "--table-type", "q8_0", "--type", "q9_k",
              needle="not a llama-quantize type")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    cli_error("quantize", tmp_path / "x.gguf", tmp_path / "o.gguf", "--table-type", "q8_0", needle="not a GGUF file")
    cli_error("quantize", src, src, "--table-type", "q8_0", needle="is the input")


def test_requantizing_a_quantized_table(tmp_path, src):
    q8 = tmp_path / "q8.gguf"
    assert cli("quantize", src, q8, "--table-type", "q8_0").exit_code == 0
    cli_error("quantize", q8, tmp_path / "q4.gguf", "--table-type", "q4_0", needle="already q8_0")
    r = cli("quantize", q8, tmp_path / "q4.gguf", "--table-type", "q4_0", "--allow-requantize")
    assert r.exit_code == 0 and "warning: re-quantizing" in r.stderr
    assert tensors(tmp_path / "q4.gguf")[TABLE].tensor_type == Q.Q4_0


def test_output_is_atomic(tmp_path, src):
    """llama-quantize fails halfway (the backbone is already q8_0, re-quantizing it is refused):
    an existing OUT is left as it was, and no partial or temporary file remains."""
    q8 = tmp_path / "q8.gguf"
    assert cli("quantize", src, q8, "--table-type", "f32", "--type", "q8_0").exit_code == 0
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    cli_error("quantize", q8, out, "--table-type", "f32", "--type", "q4_0", needle="requantizing from type q8_0")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "q8.gguf"]


def test_temp_files_of_killed_and_running_writers(tmp_path, src):
    """Quantize writes through the converter's atomic path: the temp file of a killed run (no
    lock) is removed by the next run, the one a running writer holds locked is left alone."""
    out = tmp_path / "out.gguf"
    stale, running = tmp_path / ".out.gguf.0badc0de.tmp", tmp_path / ".out.gguf.0000beef.tmp"
    stale.write_bytes(b"partial")
    running.write_bytes(b"partial")
    with open(running, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert cli("quantize", src, out, "--table-type", "q8_0").exit_code == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "out.gguf"]
    assert tensors(out)[TABLE].tensor_type == Q.Q8_0


# ---- every table type and method through llama.cpp's gather ------------------------------------

# m = 256: every table type's block divides it (the 256-value k- and iq-types included)
WIDE = MekiConfig(vocab_size=512, n_layer=2, d_model=64, d_mem=256, d_ff=128, n_head=4, n_kv_head=2, head_dim=16)
CASES = [(t, m) for t in TABLE_TYPES if t not in ("f32", "f16", "bf16") for m in methods_for(t)]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wide")
    ckpt = Checkpoint(WIDE, init_random(WIDE, seed=2).state_dict(), "hf", d)
    return write_gguf(ckpt, d / "wide.gguf", outtype="f16", table_type="f32",
                      tokenizer=tiny_tokenizer_dir(d / "tok"), progress=False)


def gathered(path: Path, tmp: Path, ids: list[int], name: str) -> np.ndarray:
    """The values of graph tensor `name` (each layer's, for a per-layer one) for one ubatch of
    `ids`, from the patched llama.cpp (llama-logits --dump)."""
    rows = tmp / f"{name}.f32"
    subprocess.run([llama_tool("llama-logits"), "-m", path, "-p", ",".join(map(str, ids)), "-n", "1",
                    "-o", tmp / "logits.f32", "-b", "64", "-ub", "64", "--dump", f"{name}:{rows}"],
                   check=True, capture_output=True)
    return np.fromfile(rows, np.float32)


def within_one_ulp(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.all(np.abs(got - want) <= np.spacing(np.abs(want).astype(np.float32))))


@pytest.mark.parametrize("table_type, method", CASES, ids=[f"{t}-{m}" for t, m in CASES])
def test_gathered_rows_are_the_dequantized_table(tmp_path, wide, table_type, method):
    """llama.cpp's gather of each table type and method equals the table dequantized here in
    numpy, within one float32 ulp: the rows as stored, and (scaled) the rows times the scales."""
    out = quantize(wide, tmp_path / "q.gguf", table_type, method=method)
    r = gguf.GGUFReader(out)
    t = next(x for x in r.tensors if x.name == TABLE)
    assert t.tensor_type == Q[table_type.upper()]
    scales = file_scales(r)
    assert (scales is not None) == (method == "scaled")
    ids = [0, 1, 2, 7, 255, 256, 300, 511, 5, 5] + list(range(17, 512, 13))[:54]      # 64 tokens, all layers' slices
    L, m = WIDE.n_layer, WIDE.d_mem
    stored = dequantize(t).reshape(-1, L * m)[ids]
    assert within_one_ulp(gathered(out, tmp_path, ids, "meki_mem").reshape(len(ids), L * m), stored)
    if scales is not None:
        got = gathered(out, tmp_path, ids, "meki_mem_scaled").reshape(L, len(ids), m)    # one dump per layer
        want = (stored * scales).reshape(len(ids), L, m).transpose(1, 0, 2)
        assert within_one_ulp(got, want)
        # the scales are each column's RMS over the vocabulary, and the stored columns have RMS 1
        src = table_f32(wide)
        np.testing.assert_allclose(scales, np.sqrt(np.square(src, dtype=np.float64).mean(0)), rtol=1e-6)


TIERS = [("q8_0", "q4_0", False), ("q5_k", "iq2_s", True)]       # (hot, cold, a stored row order)


@pytest.mark.parametrize("hot, cold, order", TIERS, ids=[f"{h}-{c}{'-order' if o else ''}" for h, c, o in TIERS])
def test_two_tier_gathered_rows_are_each_tiers_rows(tmp_path, wide, hot, cold, order):
    """A two-tier table (docs/FORMAT.md): llama.cpp's gather takes each token's row from its tier,
    equal within one ulp to that tier dequantized here, through the stored row order if any; the
    scales (one set for both tiers) multiply both."""
    V, L, m = WIDE.vocab_size, WIDE.n_layer, WIDE.d_mem
    row_order = np.random.default_rng(3).permutation(V) if order else None
    out = quantize(wide, tmp_path / "t.gguf", hot, cold_type=cold, hot_rows=100, row_order=row_order)
    assert table_tiers(out) == [(hot, 100), (cold, V - 100)]
    r = gguf.GGUFReader(out)
    ts = {t.name: t for t in r.tensors}
    tiered = np.concatenate([dequantize(ts[TABLE]).reshape(-1, L * m), dequantize(ts[COLD]).reshape(-1, L * m)])
    row = np.arange(V) if row_order is None else np.asarray(r.fields[ROW_ORDER].contents())
    assert (ROW_ORDER in r.fields) == order and np.array_equal(row, np.arange(V) if row_order is None else row_order)
    ids = [0, 1, 2, 7, 99, 100, 101, 255, 256, 300, 511, 5, 5] + list(range(17, 512, 13))[:51]   # both tiers
    assert {int(row[i]) < 100 for i in ids} == {True, False}
    want = tiered[row[ids]]
    assert within_one_ulp(gathered(out, tmp_path, ids, "meki_mem").reshape(len(ids), L * m), want)
    scales = file_scales(r)
    assert scales is not None                                     # both types' defaults are scaled
    got = gathered(out, tmp_path, ids, "meki_mem_scaled").reshape(L, len(ids), m)
    assert within_one_ulp(got, (want * scales).reshape(len(ids), L, m).transpose(1, 0, 2))


@pytest.mark.parametrize("kw, needle", [
    (dict(hot_rows=100), "give its cold type (--cold-type)"),
    (dict(cold_type="q4_0"), "a two-tier table needs between 1 and 511 hot rows (not None)"),
    (dict(cold_type="q4_0", hot_rows=512), "a two-tier table needs between 1 and 511 hot rows (not 512)"),
    (dict(cold_type="q4_0", hot_rows=10, row_order=np.zeros(512, np.int64)), "not a permutation of the table's 512 rows"),
    (dict(cold_type="q5_k", hot_rows=10), "--cold-type q5_k: its blocks of 256 values do not divide the memory width m = 32"),
])
def test_bad_two_tier_specs(tmp_path, src, kw, needle):
    with pytest.raises(MekiError, match=re.escape(needle)):
        quantize(src, tmp_path / "t.gguf", "q8_0", **kw)
    assert not (tmp_path / "t.gguf").exists()


def test_table_bits_and_row_order_text(tmp_path, wide):
    """--table-bits takes the measured recommendation (BUDGETS): for Qwen's vocabulary two tiers with
    as many hot rows as fit the budget, for a small one (here 512 tokens) the single-type front;
    --row-order-text stores the text's frequency order (its most frequent token gets row 0)."""
    from meki_gguf.quantize import SINGLE_FRONT, bits_per_value, budget_tiers, row_order_from_text
    V = 151680
    for b in (4.3, 3.0, 2.6, 2.1):
        hot, cold, k = budget_tiers(b, V, 256)
        size = (k * bits_per_value(hot) + (V - k) * bits_per_value(cold)) / V
        assert cold is not None and size <= b < (size + (bits_per_value(hot) - bits_per_value(cold)) / V * 1.01), (b, hot, cold, k)
    assert budget_tiers(4.5, V, 256) == ("q4_k", None, None)
    with pytest.raises(MekiError, match="smallest table measured"):
        budget_tiers(1.7, V, 256)
    r = CliRunner().invoke(main, ["quantize", str(wide), str(tmp_path / "s.gguf"), "--table-bits", "3"])
    assert r.exit_code == 0, r.output
    assert table_tiers(tmp_path / "s.gguf") == [("iq2_s", WIDE.vocab_size)] and "iq2_s" in SINGLE_FRONT

    text = tmp_path / "text.txt"
    text.write_text(Path("/usr/share/common-licenses/GPL-3").read_text()[:20000])
    out = tmp_path / "b.gguf"
    r = CliRunner().invoke(main, ["quantize", str(wide), str(out), "--table-type", "q6_k", "--cold-type", "iq2_s",
                                  "--hot-rows", "56", "--row-order-text", str(text)])
    assert r.exit_code == 0, r.output
    assert table_tiers(out) == [("q6_k", 56), ("iq2_s", WIDE.vocab_size - 56)]
    order = np.asarray(gguf.GGUFReader(out).fields[ROW_ORDER].contents())
    assert np.array_equal(order, row_order_from_text(wide, text))
    ids = np.asarray(__import__("llama_cpp").Llama(str(wide), vocab_only=True, verbose=False).tokenize(
        text.read_bytes(), add_bos=False))
    assert order[np.bincount(ids).argmax()] == 0


def test_llama_quantize_keeps_the_tiers(tmp_path, src):
    """llama-quantize itself on a two-tier file (a backbone type, no --tensor-type): both tiers and
    the row order pass through as they are, the backbone is quantized (patch 0002)."""
    order = np.random.default_rng(1).permutation(TINY.vocab_size)
    tiers = quantize(src, tmp_path / "t.gguf", "q8_0", cold_type="q4_0", hot_rows=100, row_order=order)
    out = tmp_path / "b.gguf"
    subprocess.run([llama_tool("llama-quantize"), tiers, out, "Q8_0", "2"], check=True, capture_output=True)
    r = gguf.GGUFReader(out)
    t = {x.name: x for x in r.tensors}
    assert table_tiers(out) == [("q8_0", 100), ("q4_0", TINY.vocab_size - 100)]
    assert t["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0
    assert np.array_equal(np.asarray(r.fields[ROW_ORDER].contents()), order)
    for name in (TABLE, COLD):
        assert np.array_equal(np.asarray(t[name].data), np.asarray(tensors(tiers)[name].data))


def test_a_two_tier_table_is_not_tiered_again(tmp_path, src):
    tiers = quantize(src, tmp_path / "t.gguf", "q8_0", cold_type="q4_0", hot_rows=100)
    with pytest.raises(MekiError, match="already in two tiers"):
        quantize(tiers, tmp_path / "u.gguf", "q4_0")


def test_weighted_and_scaled_lower_the_kld(tmp_path, wide):
    """A regression guard, not the benchmark (scripts/table_quality.py): on a small random model
    whose mix-norm weights vary by +-20% (init_random), the weighted and scaled tables have a lower
    mean KL divergence from the f32 table than llama.cpp's plain rounding, at each type checked."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from table_quality import kl, perplexity

    text = tmp_path / "text.txt"
    text.write_text(Path("/usr/share/common-licenses/GPL-3").read_text()[:40000])
    base = tmp_path / "base.kld"
    perplexity(wide, text, base, 128, 8, 2, kld=False)
    for t in ("q4_1", "q3_k", "q2_k"):
        kld = {m: kl(quantize(wide, tmp_path / f"{t}-{m}.gguf", t, method=m), text, base, 128, 8, 2)[0]
               for m in ("plain", "weighted", "scaled")}
        print(t, kld)
        assert kld["scaled"] < kld["plain"] and kld["weighted"] < kld["plain"], (t, kld)


def test_the_defaults_and_the_method_option(tmp_path, wide, src):
    """`quantize` picks each type's measured default; --table-method overrides it; a type that
    exists only weighted refuses the plain rounding in one line."""
    out = tmp_path / "out.gguf"
    assert cli("quantize", wide, out, "--table-type", "q3_k").exit_code == 0
    assert (file_scales(gguf.GGUFReader(out)) is not None) == (method_of("q3_k") == "scaled")
    assert cli("quantize", wide, out, "--table-type", "q3_k", "--table-method", "plain").exit_code == 0
    assert file_scales(gguf.GGUFReader(out)) is None
    kv = gguf.GGUFReader(out).fields
    assert "quantize.imatrix.file" not in kv
    assert cli("quantize", wide, out, "--table-type", "q3_k", "--table-method", "weighted").exit_code == 0
    assert gguf.GGUFReader(out).fields["quantize.imatrix.file"].contents() == "meki-table-importance.gguf"
    cli_error("quantize", wide, tmp_path / "o.gguf", "--table-type", "iq2_xs", "--table-method", "plain",
              needle="exists only with a weighted rounding")
    # a scaled table keeps its scales when it is quantized again
    q8 = quantize(wide, tmp_path / "q8.gguf", "q8_0", method="scaled")
    q4 = quantize(q8, tmp_path / "q4.gguf", "q4_0", allow_requantize=True)
    np.testing.assert_array_equal(file_scales(gguf.GGUFReader(q4)), file_scales(gguf.GGUFReader(q8)))


BAD_SCALES = {  # name: (edit of a scaled q4_0 file, llama.cpp's reason)
    "no-scale-in-layer-1": (dict(drop=("blk.1.meki_mem_scale.weight",)), "tensor 'blk.1.meki_mem_scale.weight' not found"),
    "no-scale-in-layer-0": (dict(drop=("blk.0.meki_mem_scale.weight",)),
                            "blk.1.meki_mem_scale.weight: in layer 1 but not in layer 0"),
    # ggml-cpu's multiply takes f32 weights only (an f16 one aborted the process at the first token)
    "f16-scale": ("blk.0.meki_mem_scale.weight", "tensor 'blk.0.meki_mem_scale.weight' is f16: it must be f32"),
    "f16-norm": ("blk.1.meki_post_norm.weight", "tensor 'blk.1.meki_post_norm.weight' is f16: it must be f32"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCALES))
def test_bad_scales_and_norms_are_refused(tmp_path, wide, case):
    """A table's scales come for every layer or for none, and, like the norms, in f32: llama.cpp
    refuses any other file at load, and `generate` says why in one line."""
    q = quantize(wide, tmp_path / "q.gguf", "q4_0", method="scaled")
    edit, reason = BAD_SCALES[case]
    if isinstance(edit, str):                               # that tensor in f16
        data = next(np.asarray(t.data) for t in gguf.GGUFReader(q).tensors if t.name == edit)
        edit = dict(replace={edit: data.astype(np.float16)})
    bad = rewrite(q, tmp_path / "bad.gguf", **edit)
    r = subprocess.run([sys.executable, "-m", "meki_gguf.cli", "generate", str(bad), "-p", "Hi", "-n", "2", "--temp", "0"],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], r.stderr[-3000:]
    ok = subprocess.run([sys.executable, "-m", "meki_gguf.cli", "generate", str(q), "-p", "Hi", "-n", "2", "--temp", "0"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
