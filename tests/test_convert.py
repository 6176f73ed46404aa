"""Checkpoint -> GGUF (meki_gguf/write.py, tokenizer.py, cli.py), read back with gguf-py:
every key, every backbone tensor and the folded table against the reference model, and
every bad input as a one-line error through the CLI."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import conversion.meki
import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from meki_gguf import atomic, write
from meki_gguf.checkpoint import load_checkpoint, save_hf, save_megatron
from meki_gguf.cli import main
from meki_gguf.model import MekiConfig, MekiForCausalLM, init_random
from meki_gguf.quantize import WEIGHTED, method_of
from meki_gguf.tokenizer import tiny_tokenizer_dir, tokenizer_kv

# every row length a multiple of 32, so that q8_0/q4_*/q5_* fit everywhere
TINY = MekiConfig(vocab_size=512, n_layer=2, d_model=64, d_mem=32, d_ff=128, n_head=4, n_kv_head=2, head_dim=16)
N_TOK = 320                                              # tiny tokenizer: 256 bytes, 61 merges, 3 specials
QWEN2_VOCAB = Path(__file__).parents[1] / "build/src/models/ggml-vocab-qwen2.gguf"
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> Path:
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"), n_tokens=N_TOK)


def hf_ckpt(tmp_path: Path, c: MekiConfig = TINY, dtype=torch.bfloat16, seed=0) -> tuple[MekiForCausalLM, Path]:
    model = init_random(c, seed=seed)
    save_hf(model, tmp_path / "ckpt", dtype=dtype)
    return model, tmp_path / "ckpt"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cli_error(*args, needles=(), code=None) -> str:
    """Run a failing command: one `error: ...` line on stderr, no traceback, exit code != 0."""
    r = cli(*args)
    assert r.exit_code != 0, r.output
    if code is not None:
        assert r.exit_code == code
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def read(path: Path):
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def values(t) -> np.ndarray:
    """A GGUF tensor dequantized to float32, in torch's [rows, cols] order."""
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape([int(n) for n in reversed(t.shape)])


def rounded(ref: torch.Tensor, qtype) -> np.ndarray:
    """What `ref` (float32) becomes in a float GGUF type."""
    dt = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    return ref.float().to(dt).float().numpy()


def block_tolerance(ref: np.ndarray, qtype) -> np.ndarray:
    """Per-element bound of a block quantizer's error: one step of its grid over the block's range
    (q8_0/q4_0/q5_0 span [-amax, amax], q4_1/q5_1 [min, max]), with a margin for the f16 scales."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    bits = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5}[qtype]
    b = ref.reshape(-1, block)
    lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
        hi = np.maximum(np.abs(lo), np.abs(hi)); lo = -hi
    return np.broadcast_to((hi - lo) / (2 ** bits - 1) * 1.02 + 1e-6, b.shape).reshape(ref.shape)


def assert_matches(got: np.ndarray, ref: torch.Tensor, qtype, what: str, fold_atol: float = 0.0, steps: float = 1.0):
    """got == ref rounded to qtype; with fold_atol (a float32 fold against the float64 reference),
    within half a step of the type (relative) plus fold_atol instead. steps: the block quantizer's
    bound in steps of its grid (a weighted rounding search may clamp a block's largest values by
    up to ~0.9 step to round the rest better: then 2, and the RMS error within 0.3 step)."""
    want = ref.float().numpy()
    if qtype in (Q.F32, Q.F16, Q.BF16) and not fold_atol:
        np.testing.assert_array_equal(got, rounded(ref, qtype), err_msg=what)
    elif qtype in (Q.F32, Q.F16, Q.BF16):
        rel = {Q.F32: 2.0 ** -24, Q.F16: 2.0 ** -11, Q.BF16: 2.0 ** -8}[qtype]
        assert np.all(np.abs(got - want) <= np.abs(want) * rel + fold_atol + 6e-8), what
    else:
        step = block_tolerance(want, qtype)
        assert np.all(np.abs(got - want) <= steps * step + fold_atol), what
        if steps > 1:
            assert np.sqrt(np.mean(np.square((got - want) / step))) <= 0.3, what


def reference_table(ckpt_tensors, c: MekiConfig) -> torch.Tensor:
    """Token-major [V, L*m]: the reference's training-form expert vectors, float64, on exactly
    the checkpoint's values."""
    model = MekiForCausalLM(c).double()
    model.load_state_dict({k: ckpt_tensors[k].double() for k in ckpt_tensors})
    E, ids = model.model.embed_tokens.weight, torch.arange(c.vocab_size)
    with torch.no_grad():
        return torch.cat([b.meki.expert(ids, E) for b in model.model.layers], dim=1)


# docs/FORMAT.md's tensor names, written out independently of write.py's table
FORMAT_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
for _i in range(3):
    FORMAT_NAMES.update({f"model.layers.{_i}.{a}": f"blk.{_i}.{b}" for a, b in [
        ("input_layernorm.weight", "attn_norm.weight"), ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"), ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"), ("self_attn.q_norm.weight", "attn_q_norm.weight"),
        ("self_attn.k_norm.weight", "attn_k_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"), ("meki.gate_proj.weight", "meki_gate.weight"),
        ("meki.out_proj.weight", "meki_out.weight"), ("meki.post_norm.weight", "meki_post_norm.weight")]})

CASES = [  # outtype, table type, config changes, checkpoint
    ("f32", "f32", dict(), "hf-f32"),
    ("f16", "f16", dict(dyn_norm=True), "megatron"),          # the Transformer Engine spec
    ("f32", "f32", dict(), "megatron"),                        # the local spec, its twin
    ("bf16", "q8_0", dict(qk_norm=True, tied=False), "hf-bf16"),
    ("q8_0", "q4_0", dict(dyn_norm=True, qk_norm=True), "hf-bf16"),
    ("f16", "q4_1", dict(tied=False), "hf-bf16"),
    ("f16", "q5_0", dict(), "hf-bf16"),
    ("f16", "q5_1", dict(d_mem=64, n_layer=3), "hf-bf16"),
    ("f32", "bf16", dict(), "hf-bf16"),
]


@pytest.mark.parametrize("outtype,table_type,changes,layout", CASES,
                         ids=[f"{o}-{t}-{l}" + "".join(f"-{k}" for k in ch) for o, t, ch, l in CASES])
def test_convert_round_trip(tmp_path, tok, outtype, table_type, changes, layout):
    c = replace(TINY, **changes)
    model = init_random(c, seed=1)
    if layout == "megatron":
        src = save_megatron(model, tmp_path / "mg")
    else:
        src = tmp_path / "hf"
        save_hf(model, src, dtype=torch.float32 if layout == "hf-f32" else torch.bfloat16)
    out = tmp_path / "m.gguf"
    r = cli("convert", src, "-o", out, "--outtype", outtype, "--table-type", table_type, "--tokenizer", tok)
    assert r.exit_code == 0, r.output + repr(r.exception)
    ckpt = load_checkpoint(src)                           # the reference values, in the checkpoint's dtype
    kv, tensors = read(out)

    # metadata: every key against the config
    otype, ttype = Q[outtype.upper()], Q[table_type.upper()]
    want = {
        "general.architecture": "meki", "general.type": "model", "general.quantization_version": 2,
        "general.file_type": int(write.OUT_TYPES[outtype]),
        "meki.context_length": c.max_seq_len, "meki.embedding_length": c.d_model, "meki.block_count": c.n_layer,
        "meki.feed_forward_length": c.d_ff, "meki.attention.head_count": c.n_head,
        "meki.attention.head_count_kv": c.n_kv_head, "meki.attention.key_length": c.head_dim,
        "meki.attention.value_length": c.head_dim, "meki.embedding_length_per_layer_input": c.d_mem,
    }
    for k, v in want.items():
        assert kv[k] == v, k
    assert kv["general.name"].lower() == src.name.lower()    # as llama.cpp's converter names it (gguf.Metadata)
    assert kv["meki.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps, rel=1e-6)
    assert kv["meki.rope.freq_base"] == pytest.approx(c.rope_theta, rel=1e-6)
    assert not {k for k in kv if k.startswith("meki.")} - set(want) - {
        "meki.attention.layer_norm_rms_epsilon", "meki.rope.freq_base"}

    # tokenizer: llama.cpp's conversion of the tiny BPE, padded to the model's rows
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    toks, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(toks) == len(types) == c.vocab_size
    assert toks[N_TOK - 1] == "<|im_end|>" and kv["tokenizer.ggml.eos_token_id"] == N_TOK - 1
    assert toks[N_TOK:] == [f"[PAD{i}]" for i in range(N_TOK, c.vocab_size)]
    assert set(types[N_TOK:]) == {gguf.TokenType.UNUSED} and gguf.TokenType.UNUSED not in types[:N_TOK]
    assert len(kv["tokenizer.ggml.merges"]) == N_TOK - 256 - 3 and "<|im_start|>" in kv["tokenizer.chat_template"]

    # backbone: exactly the FORMAT.md names, types and (reversed) shapes; values to the type's rounding
    sd = ckpt.tensors
    scaled = method_of(table_type) == "scaled"          # quantized tables: with their column scales (quantize.py)
    scale_names = {f"blk.{il}.meki_mem_scale.weight" for il in range(c.n_layer)} if scaled else set()
    assert set(tensors) == {FORMAT_NAMES[k] for k in sd if k in FORMAT_NAMES} | {"meki_mem.weight"} | scale_names
    assert all(".meki.memory." in k or ".meki.dyn." in k or ".meki.mix_norm." in k or k.endswith((".alpha", ".beta"))
               for k in sd if k not in FORMAT_NAMES)        # the rest is folded into the table
    assert ("output.weight" in tensors) == (not c.tied)
    assert ("blk.0.attn_q_norm.weight" in tensors) == ("blk.0.attn_k_norm.weight" in tensors) == c.qk_norm
    assert tensors["blk.1.meki_gate.weight"].shape.tolist() == [c.d_model, c.d_mem]
    assert tensors["blk.1.meki_out.weight"].shape.tolist() == [c.d_mem, c.d_model]
    for name, gname in FORMAT_NAMES.items():
        if name not in sd:
            continue
        t, ref = tensors[gname], sd[name]
        assert t.shape.tolist() == list(reversed(ref.shape)), gname
        qtype = otype if ref.dim() == 2 else Q.F32
        assert t.tensor_type == qtype, gname
        assert_matches(values(t), ref, qtype, gname)

    # the table: {L*m, V}, token-major, equal to the reference fold up to the table type
    t = tensors["meki_mem.weight"]
    assert t.tensor_type == ttype and t.shape.tolist() == [c.n_layer * c.d_mem, c.vocab_size]
    table = reference_table(sd, c)
    got = values(t)
    assert got.shape == (c.vocab_size, c.n_layer * c.d_mem)
    if scaled:        # each column stored divided by its RMS over the vocabulary, the scales [m] f32 per layer
        s = torch.from_numpy(np.concatenate([values(tensors[f"blk.{il}.meki_mem_scale.weight"]) for il in range(c.n_layer)]))
        torch.testing.assert_close(s.double(), table.pow(2).mean(0).sqrt(), rtol=1e-5, atol=0)
        table = table / s.double()
    assert_matches(got, table.float(), ttype, "meki_mem.weight", fold_atol=1e-5,
                   steps=2.0 if method_of(table_type) != "plain" and table_type in WEIGHTED else 1.0)
    if ttype == Q.F32:                                    # spot-check the layout by hand: row t, slice l
        model64 = MekiForCausalLM(c).double()
        model64.load_state_dict({k: v.double() for k, v in sd.items()})
        E = model64.model.embed_tokens.weight
        for l, tok_id in [(0, 0), (1, 5), (c.n_layer - 1, c.vocab_size - 1)]:
            with torch.no_grad():
                want_row = model64.model.layers[l].meki.expert(torch.tensor([tok_id]), E)[0]
            np.testing.assert_allclose(got[tok_id, l * c.d_mem:(l + 1) * c.d_mem], want_row.numpy(), atol=1e-5)


def test_converting_piece_by_piece_changes_nothing(tmp_path, tok, monkeypatch):
    """Chunks of the table are folded and written as they come: small chunks (uneven last one)
    give the same file as the default."""
    _, src = hf_ckpt(tmp_path, replace(TINY, vocab_size=500, dyn_norm=True))
    ckpt = load_checkpoint(src)
    one = write.write_gguf(ckpt, tmp_path / "one.gguf", "q8_0", "q8_0", tokenizer=tok)
    many = write.write_gguf(ckpt, tmp_path / "many.gguf", "q8_0", "q8_0", tokenizer=tok, chunk=96)
    (_, a), (_, b) = read(one), read(many)
    for name in a:
        if name != "meki_mem.weight":
            assert np.array_equal(a[name].data, b[name].data), name
    np.testing.assert_allclose(values(b["meki_mem.weight"]), values(a["meki_mem.weight"]), atol=0.05, rtol=0)
    assert_matches(values(b["meki_mem.weight"]), reference_table(ckpt.tensors, ckpt.config).float(), Q.Q8_0,
                   "meki_mem.weight", fold_atol=1e-5)


def test_inspect(tmp_path, tok):
    _, src = hf_ckpt(tmp_path, replace(TINY, dyn_norm=True))
    out = tmp_path / "m.gguf"
    r = cli("convert", src, "-o", out, "--outtype", "q8_0", "--table-type", "q4_0", "--tokenizer", tok)
    assert r.exit_code == 0 and r.stdout.startswith(f"wrote {out}"), r.output
    r = cli("inspect", out)
    assert r.exit_code == 0, r.output
    for needle in ["2 layers, d 64, m 32, FFN 128, heads 4/2 x 16, vocab 512", "gpt2 (pre qwen2), 512 tokens",
                   "table q4_0", "{2*32, 512}", "64 table values = 36 bytes read"]:
        assert needle in r.stdout, r.stdout


def test_convert_to_two_tiers(tmp_path, tok):
    """convert --cold-type/--hot-rows writes the table in two tiers, as `quantize` does; inspect shows both."""
    _, src = hf_ckpt(tmp_path)
    out = tmp_path / "t.gguf"
    r = cli("convert", src, "-o", out, "--table-type", "q8_0", "--cold-type", "q4_0", "--hot-rows", "128", "--tokenizer", tok)
    assert r.exit_code == 0, r.output
    r = cli("inspect", out)
    assert r.exit_code == 0, r.output
    for needle in ["table q8_0/q4_0", "meki_mem.weight {2*32, 128} q8_0", "meki_mem_cold.weight {2*32, 384} q4_0",
                   "the first 128 rows of the token ids' order", "64 table values = 68 (q8_0) or 36 (q4_0) bytes read"]:
        assert needle in r.stdout, r.stdout


def test_tokenizer_from_the_checkpoint_folder_and_from_a_gguf(tmp_path, tok):
    # no --tokenizer: the checkpoint folder's own (HF layout, and a Megatron root)
    _, src = hf_ckpt(tmp_path)
    for f in tok.iterdir():
        shutil.copy(f, src)
    first = tmp_path / "a.gguf"
    assert cli("convert", src, "-o", first).exit_code == 0
    mg = save_megatron(init_random(TINY), tmp_path / "mg")
    for f in tok.iterdir():
        shutil.copy(f, mg)
    assert cli("convert", mg / "iter_0001000", "-o", tmp_path / "mg.gguf").exit_code == 0
    assert read(tmp_path / "mg.gguf")[0]["general.name"] == "Mg"             # the root's name, as gguf.Metadata spells it

    # a GGUF as the tokenizer: every tokenizer.* key copied; padded (more rows) or trailing
    # [PAD] tokens dropped (fewer rows, but more than the real tokens)
    kv0, _ = read(first)
    for rows in (384, 640):
        _, src2 = hf_ckpt(tmp_path / str(rows), replace(TINY, vocab_size=rows))
        out = tmp_path / f"{rows}.gguf"
        r = cli("convert", src2, "-o", out, "--tokenizer", first)
        assert r.exit_code == 0, r.output
        kv, _ = read(out)
        assert len(kv["tokenizer.ggml.tokens"]) == len(kv["tokenizer.ggml.token_type"]) == rows
        assert kv["tokenizer.ggml.tokens"][:N_TOK] == kv0["tokenizer.ggml.tokens"][:N_TOK]
        assert kv["tokenizer.ggml.tokens"][-1] == f"[PAD{rows - 1}]"
        for k in kv0:
            if k.startswith("tokenizer.") and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
                assert kv[k] == kv0[k], k


def _vocab_gguf(path: Path, n_real: int, n_pad: int) -> Path:
    """A small llama GGUF vocab: n_real tokens, then n_pad [PAD{i}] typed USER_DEFINED (older
    converters' padding, as in llama.cpp's models/ggml-vocab-qwen2.gguf)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"t{i}" for i in range(n_real)] + [f"[PAD{i}]" for i in range(n_real, n_real + n_pad)])
    w.add_token_types([gguf.TokenType.NORMAL] * n_real + [gguf.TokenType.USER_DEFINED] * n_pad)
    w.add_token_merges(["t 0"])
    w.add_eos_token_id(n_real - 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.skipif(not QWEN2_VOCAB.is_file(), reason="llama.cpp's models/ggml-vocab-qwen2.gguf not found")
def test_real_qwen_vocab_onto_mekis_padded_rows():
    """The production case: a Qwen GGUF vocab (151936 entries, 151646 real tokens) onto MeKi's
    151680 rows: the surplus padding is dropped, everything else copied. (~9 s: GGUFReader.)"""
    kv = {k: v.value for k, v in tokenizer_kv(QWEN2_VOCAB, 151680).items()}
    toks = kv["tokenizer.ggml.tokens"]
    assert len(toks) == len(kv["tokenizer.ggml.token_type"]) == 151680
    assert toks[151645] == "<|im_end|>" and toks[-1] == "[PAD151679]" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert len(kv["tokenizer.ggml.merges"]) == 151387 and kv["tokenizer.ggml.eos_token_id"] == 151643
    assert "<|im_start|>" in kv["tokenizer.chat_template"]


# ---- bad input, through the CLI ---------------------------------------------------------------

def test_unknown_and_unsupported_types(tmp_path, tok):
    _, src = hf_ckpt(tmp_path)
    out = tmp_path / "m.gguf"
    cli_error("convert", src, "-o", out, "--outtype", "q9_9", "--tokenizer", tok, needles=["unknown type 'q9_9'"])
    cli_error("convert", src, "-o", out, "--table-type", "f8", "--tokenizer", tok, needles=["unknown type 'f8'"])
    for opt, t in [("--outtype", "q4_0"), ("--outtype", "q6_k")]:
        cli_error("convert", src, "-o", out, opt, t, "--tokenizer", tok, needles=[opt, t, "meki-gguf quantize"])
    for t in ("q4_k", "iq2_xxs"):                 # every table type converts, where its block divides m
        cli_error("convert", src, "-o", out, "--table-type", t, "--tokenizer", tok,
                  needles=[f"--table-type {t}", "= 32", "block size 256"])
    assert not out.exists()


def test_rows_not_divisible_by_the_block(tmp_path, tok):
    _, src = hf_ckpt(tmp_path, replace(TINY, d_mem=16))
    out = tmp_path / "m.gguf"
    cli_error("convert", src, "-o", out, "--table-type", "q8_0", "--tokenizer", tok,
              needles=["--table-type q8_0", "m (memory width", "= 16", "block size 32"])
    cli_error("convert", src, "-o", out, "--outtype", "q8_0", "--tokenizer", tok,
              needles=["--outtype q8_0", "blk.0.meki_out.weight", "= 16", "block size 32"])
    _, src = hf_ckpt(tmp_path / "2", replace(TINY, d_ff=48))
    cli_error("convert", src, "-o", out, "--outtype", "q8_0", "--tokenizer", tok,
              needles=["blk.0.ffn_down.weight", "= 48", "32"])
    assert not out.exists()


def test_tokenizer_errors(tmp_path, tok):
    out = tmp_path / "m.gguf"
    _, small = hf_ckpt(tmp_path, replace(TINY, vocab_size=256))
    cli_error("convert", small, "-o", out, "--tokenizer", tok, needles=[f"{N_TOK} tokens", "256 embedding/table rows"])
    # a GGUF tokenizer: real tokens beyond the rows (its trailing padding would be dropped)
    big = _vocab_gguf(tmp_path / "big.gguf", n_real=300, n_pad=100)
    cli_error("convert", small, "-o", out, "--tokenizer", big, needles=["300 tokens", "256 embedding/table rows"])
    _, src = hf_ckpt(tmp_path / "2")
    cli_error("convert", src, "-o", out, needles=["no tokenizer", "--tokenizer"])
    cli_error("convert", src, "-o", out, "--tokenizer", src / "config.json", needles=["not a GGUF file"])
    cli_error("convert", src, "-o", out, "--tokenizer", tmp_path, needles=["no tokenizer.json"])
    cli_error("convert", src, "-o", out, "--tokenizer", tmp_path / "nope", needles=["nope", "does not exist"])
    assert not out.exists()


def test_other_usage_errors(tmp_path, tok):
    cli_error("convert", tmp_path / "missing", "-o", tmp_path / "m.gguf", needles=["missing"], code=2)
    _, src = hf_ckpt(tmp_path)
    cli_error("convert", src, needles=["-o"], code=2)
    cli_error("convert", src, "-o", tmp_path / "no" / "m.gguf", "--tokenizer", tok, needles=["does not exist"])
    cli_error("frobnicate", needles=["frobnicate"], code=2)
    cli_error("convert", tmp_path, "-o", tmp_path / "m.gguf")      # not a checkpoint: checkpoint.py's error
    cli_error("inspect", src / "config.json", needles=["not a GGUF file"])
    cli_error("inspect", tmp_path / "nope.gguf", needles=["does not exist"])
    cli_error("inspect", _vocab_gguf(tmp_path / "llama.gguf", 10, 0), needles=["'llama'", "not a MeKi"])


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_output_is_atomic(tmp_path, tok, monkeypatch, failure):
    """A failure mid-table (after the header, the backbone and one chunk of the table are
    written): no OUT, no temp file, and a pre-existing OUT untouched."""
    _, src = hf_ckpt(tmp_path)
    real, calls = conversion.meki.fold_rows, []

    def broken(*args, **kwargs):                       # the third chunk of the table fails
        calls.append(1)
        if len(calls) == 3:
            raise failure("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(conversion.meki, "fold_rows", broken)
    monkeypatch.setattr(write._Converter, "fold_chunk", 100)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    if failure is KeyboardInterrupt:
        cli_error("convert", src, "-o", out, "--tokenizer", tok, needles=["interrupted"], code=130)
    else:
        with pytest.raises(RuntimeError, match="injected"):
            write.write_gguf(load_checkpoint(src), out, tokenizer=tok)
    assert list(out_dir.iterdir()) == []

    out.write_bytes(b"previous")
    calls.clear()
    with pytest.raises(failure):
        write.write_gguf(load_checkpoint(src), out, tokenizer=tok)
    assert list(out_dir.iterdir()) == [out] and out.read_bytes() == b"previous"

    monkeypatch.setattr(conversion.meki, "fold_rows", real)       # and a good run replaces it
    write.write_gguf(load_checkpoint(src), out, tokenizer=tok)
    assert list(out_dir.iterdir()) == [out] and read(out)[0]["general.architecture"] == "meki"
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())


# ---- the converter under faults: a full disk, a read-only folder, Ctrl-C, SIGKILL -------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> an empty folder with a fresh tmpfs mounted on it (e.g. "size=1m"), unmounted
    after the test. Skips where mounting is not permitted (needs root / CAP_SYS_ADMIN)."""
    mounts = []

    def mount(options: str) -> Path:
        d = tmp_path / f"mnt{len(mounts)}"
        d.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"\nskipped: cannot mount a tmpfs: {r.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounts.append(d)
        return d
    yield mount
    for d in reversed(mounts):
        subprocess.run(["umount", str(d)], check=True)


def temps(out: Path) -> list[Path]:
    """The converter's temp files for `out` (atomic.replace_atomically's names)."""
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def test_disk_full(tmp_path, tok, tmpfs):
    """The disk fills up mid-write: a one-line error that says so and names the file, no OUT, no
    temp file, and the space is free again (a model that fits converts next)."""
    _, src = hf_ckpt(tmp_path, replace(TINY, vocab_size=4096, d_mem=64))   # 2.6 MiB with an f32 table
    d = tmpfs("size=1m")
    out = d / "m.gguf"
    line = cli_error("convert", src, "-o", out, "--table-type", "f32", "--tokenizer", tok,
                     needles=[f"cannot write {out}", "disk", "is full", "ENOSPC"])
    print(f"\n{line}")
    assert list(d.iterdir()) == []
    _, small = hf_ckpt(tmp_path / "small")
    assert cli("convert", small, "-o", out, "--tokenizer", tok).exit_code == 0
    assert list(d.iterdir()) == [out]


def test_read_only_output_folder(tmp_path, tok, tmpfs):
    """A read-only output folder (a read-only mount: root ignores chmod): a one-line error, and
    the previous OUT left as it was."""
    _, src = hf_ckpt(tmp_path)
    d = tmpfs("size=1m")
    out = d / "m.gguf"
    out.write_bytes(b"previous")
    subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
    line = cli_error("convert", src, "-o", out, "--tokenizer", tok, needles=[f"cannot write {out}", "read-only", "EROFS"])
    print(f"\n{line}")
    assert list(d.iterdir()) == [out] and out.read_bytes() == b"previous"


def test_output_folder_without_write_permission(tmp_path, tok):
    """A folder the user may not write in (chmod 0555). Root ignores the mode, so the command runs
    without the capabilities that let it (setpriv), as an ordinary user would."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    _, src = hf_ckpt(tmp_path)
    d = tmp_path / "out"
    d.mkdir(mode=0o555)
    out = d / "m.gguf"
    r = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", sys.executable, "-m",
                        "meki_gguf.cli", "convert", src, "-o", out, "--tokenizer", tok],
                       capture_output=True, text=True, timeout=300)
    print(f"\n{r.stderr.strip()}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: cannot write {out}: no permission to write in {d} (EACCES"), r.stderr
    assert list(d.iterdir()) == []


@pytest.fixture(scope="module")
def slow_src(tmp_path_factory) -> Path:
    """A checkpoint whose conversion writes its temp file for seconds (32768 tokens, an f32 table of
    32 MiB: ~9 s on 2 loaded cores)."""
    return hf_ckpt(tmp_path_factory.mktemp("slow"), replace(TINY, vocab_size=32768, d_mem=128))[1]


def start_convert(src: Path, out: Path, tok: Path, written: int = 8 << 20) -> subprocess.Popen:
    """`meki-gguf convert` in its own process, returned once its temp file holds `written` bytes
    (by default in the middle of the table, after the 4 MiB backbone). It starts with SIGINT at its
    default, as a command typed at a terminal: it would inherit pytest's, which is "ignored" when
    pytest runs as a background job of a script (`pytest -q &`), and keep ignoring Ctrl-C, rightly."""
    p = subprocess.Popen([sys.executable, "-m", "meki_gguf.cli", "convert", str(src), "-o", str(out),
                          "--table-type", "f32", "--tokenizer", str(tok)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while _written(out) < written:
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"convert ended or stalled before writing {written} bytes (rc {p.returncode}): "
                        f"{p.communicate()}")
        time.sleep(0.005)
    return p


def _written(out: Path) -> int:
    n = 0
    for f in temps(out):
        try:
            n += f.stat().st_size
        except FileNotFoundError:                     # renamed onto out meanwhile
            pass
    return n


@pytest.mark.parametrize("written", [2 << 20, 8 << 20], ids=["backbone", "table"])
def test_ctrl_c_mid_conversion(tmp_path, tok, slow_src, written):
    """SIGINT while the file is being written (after token_embd, or mid-table): exit 130 with
    `error: interrupted`, no OUT, and the temp file removed. The converter is stopped where it is once its
    temp file holds `written` bytes and gets the SIGINT as it resumes: the signal lands before the
    rename however loaded the machine (it writes the last 28 MiB of the table in 0.1-0.3 s)."""
    d = tmp_path / "out"
    d.mkdir()
    out = d / "m.gguf"
    p = start_convert(slow_src, out, tok, written)
    try:
        p.send_signal(signal.SIGSTOP)
        _, status = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"convert ended before it could be stopped (wait status {status})"
        held = _written(out)
        assert held >= written and not out.exists(), "stopped after its rename: too late to test a Ctrl-C mid-write"
        t = time.time()
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGCONT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()                                      # (a no-op once it has ended)
    print(f"\nSIGINT at {held / 2**20:.1f} MiB: exit {p.returncode} {time.time() - t:.2f} s later, stderr {err.strip()!r}")
    assert p.returncode == 130 and err.strip() == "error: interrupted", err
    assert list(d.iterdir()) == []


def test_sigkill_mid_conversion_then_convert_again(tmp_path, tok, slow_src):
    """SIGKILL cannot be caught: the temp file stays, no OUT. A live conversion's temp file is
    never taken for a stale one (its writer holds a lock on it); the dead one's is, and the next
    conversion removes it and succeeds."""
    d = tmp_path / "out"
    d.mkdir()
    out = d / "m.gguf"
    p = start_convert(slow_src, out, tok)
    live = temps(out)
    atomic.remove_stale(out)                          # what a second run would do now
    assert temps(out) == live
    p.kill()
    p.wait(timeout=60)
    stale = temps(out)
    print(f"\nafter SIGKILL: {[f.name for f in stale]} ({sum(f.stat().st_size for f in stale) / 2**20:.1f} MiB), "
          f"OUT exists: {out.exists()}")
    assert stale == live and not out.exists()
    r = cli("convert", slow_src, "-o", out, "--table-type", "f32", "--tokenizer", tok)
    assert r.exit_code == 0, r.output
    assert list(d.iterdir()) == [out] and read(out)[0]["general.architecture"] == "meki"


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u
