"""`meki-gguf quantize` (meki_gguf/quantize.py over the patched llama-quantize): the table's type
independent of the backbone's, the table left alone by the backbone's default rules, one-line
errors for types the table cannot have, and an output that appears complete or not at all."""
from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from meki_gguf.checkpoint import Checkpoint
from meki_gguf.cli import main
from meki_gguf.model import MekiConfig, init_random
from meki_gguf.quantize import TABLE, llama_tool
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


def table_f32(t: gguf.ReaderTensor) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, TINY.n_layer * TINY.d_mem)


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
    ref, got = table_f32(a[TABLE]), table_f32(b[TABLE])
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    # the backbone is copied as it is, byte for byte
    assert set(a) == set(b)
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
    ("iq2_xs", "needs an importance matrix"),
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
