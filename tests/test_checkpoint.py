"""Reading checkpoints (meki_gguf/checkpoint.py): both layouts round-trip, the official Megatron
layout is decoded right, and every bad input is a one-line MekiError."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from meki_gguf.checkpoint import (Opaque, _torch_load, _unpack, load_checkpoint, save_hf,
                                  save_megatron)
from meki_gguf.errors import MekiError
from meki_gguf.model import MekiConfig, init_random

TINY = MekiConfig(vocab_size=160, n_layer=2, d_model=64, d_mem=32, d_ff=96, n_head=4,
                  n_kv_head=2, head_dim=16)
PT = "iter_0001000/mp_rank_00/model_optim_rng.pt"
L0 = "decoder.layers.0."


def tiny(**kw):
    c = replace(TINY, **kw)
    return c, init_random(c, seed=1)


def assert_same(ck, model, dtype):
    assert ck.config == model.config
    ref = model.state_dict()
    assert list(ck.tensors) == list(ref)                     # exactly the names, in model order
    for k, v in ref.items():
        got = ck.tensors[k]
        assert got.dtype == dtype, k                         # the checkpoint's dtype is kept
        assert torch.equal(got, v.to(dtype)), k


_tmp: list[Path] = []


@pytest.fixture(autouse=True)
def _remember_tmp(tmp_path):
    _tmp[:] = [tmp_path]


def error(path, *needles):
    with pytest.raises(MekiError) as e:
        load_checkpoint(path)
    # pytest's folder is named after the test: keep it from matching a needle
    msg = str(e.value).replace(str(_tmp[0]), "<tmp>")
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def rewrite(file: Path, edit):
    """Edit a saved Megatron file in place (re-saved without the placeholder objects)."""
    ck = _torch_load(file)
    ck["args"].model_type = None
    ck["rng_state"] = None
    ck["model"] = {k: v.clone() for k, v in ck["model"].items()}
    edit(ck)
    tmp = file.with_suffix(".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, file)


# --- Megatron: round trip --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate_on_residual", [True, False])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_megatron_round_trip(tmp_path, dtype, gate_on_residual, qk_norm, tied):
    _, m = tiny(gate_on_residual=gate_on_residual, qk_norm=qk_norm, tied=tied)
    root = save_megatron(m, tmp_path / "ck", dtype=dtype)
    ck = load_checkpoint(root)
    assert ck.source_format == "megatron" and ck.path == root / PT
    assert_same(ck, m, dtype)


def test_megatron_layout_is_official(tmp_path):
    """The saved file looks like the released training code's: TE fused norms, _extra_state,
    a Megatron enum in args, numpy RNG state; and megatron is not left importable."""
    _, m = tiny(gate_on_residual=True, tied=False)
    file = save_megatron(m, tmp_path) / PT
    assert "megatron" not in sys.modules
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1000"
    with zipfile.ZipFile(file) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"megatron.core.enums" in pkl and b"ModelType" in pkl and b"numpy" in pkl

    raw = _torch_load(file)
    sd, args = raw["model"], raw["args"]
    for k in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight",
              "meki_module.word_emb_projection.linear_fc1.layer_norm_weight",
              "self_attention.linear_qkv._extra_state", "meki_module.gate_proj._extra_state"):
        assert L0 + k in sd, k
    assert "output_layer.weight" in sd
    assert sd[L0 + "meki_module.alpha_scale"].shape == ()
    assert isinstance(args, argparse.Namespace) and args.meki_dim == 32
    assert args.transformer_impl == "transformer_engine" and args.params_dtype is torch.bfloat16
    assert isinstance(args.model_type, Opaque)
    assert args.model_type.ref == "megatron.core.enums.ModelType" and args.model_type.args == (1,)
    np_state = raw["rng_state"][0]["np_rng_state"]
    assert np_state[0] == "MT19937" and isinstance(np_state[1], Opaque)   # an inert ndarray

    local = save_megatron(tiny(gate_on_residual=False)[1], tmp_path / "local") / PT
    sd = _torch_load(local)["model"]
    assert L0 + "input_layernorm.weight" in sd and L0 + "pre_mlp_layernorm.weight" in sd
    assert not any(k.endswith("layer_norm_weight") for k in sd)


def test_grouped_qkv_is_deinterleaved(tmp_path):
    c, m = tiny()
    hd, rep = c.head_dim, c.n_head // c.n_kv_head
    # Build Megatron's grouped matrix by hand: per KV group, its q heads, its k head, its v head.
    a = m.model.layers[0].self_attn
    q, k, v = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight
    head = lambda w, h: w[h * hd:(h + 1) * hd]
    rows = []
    for g in range(c.n_kv_head):
        rows += [head(q, g * rep + j) for j in range(rep)] + [head(k, g), head(v, g)]
    grouped = torch.cat(rows)

    file = save_megatron(m, tmp_path, dtype=torch.float32) / PT
    assert torch.equal(_torch_load(file)["model"][L0 + "self_attention.linear_qkv.weight"], grouped)
    got = load_checkpoint(tmp_path).tensors
    for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        assert torch.equal(got[f"model.layers.0.self_attn.{name}.weight"], w)
    # and on distinct integers, with one and with several groups
    for g in (1, 2, 4):
        cg = replace(c, n_kv_head=g)
        w = torch.arange((c.n_head + 2 * g) * hd * 3).reshape(-1, 3).float()
        cg = replace(cg, d_model=3)
        qq, kk, vv = _unpack("qkv", w, cg)
        per = (c.n_head // g + 2) * hd
        for grp in range(g):
            block = w[grp * per:(grp + 1) * per]
            nq = c.n_head // g * hd
            assert torch.equal(qq[grp * nq:(grp + 1) * nq], block[:nq])
            assert torch.equal(kk[grp * hd:(grp + 1) * hd], block[nq:nq + hd])
            assert torch.equal(vv[grp * hd:(grp + 1) * hd], block[nq + hd:])


def test_megatron_entry_points(tmp_path):
    _, m = tiny()
    root = save_megatron(m, tmp_path / "ck", iteration=7)
    it = root / "iter_0000007"
    for p in (root, it, it / "mp_rank_00", it / "mp_rank_00" / "model_optim_rng.pt"):
        assert load_checkpoint(str(p)).config == m.config
    # a "release" tracker
    it.rename(root / "release")
    (root / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert load_checkpoint(root).path == root / "release/mp_rank_00/model_optim_rng.pt"


def test_tensors_are_lazy_views(tmp_path):
    _, m = tiny()
    ck = load_checkpoint(save_megatron(m, tmp_path))
    fc1 = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    gate, up = (ck.tensors[n] for n in fc1)
    assert gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()   # one fc1
    assert "model.norm.weight" in ck.tensors and "nope" not in ck.tensors


def test_untrusted_containers_become_placeholders(tmp_path):
    import io
    f = tmp_path / "x.pt"
    torch.save({"a": np.arange(3), "b": io.BytesIO(b"te"), "t": torch.ones(2),
                "dt": torch.float16, "s": {1, 2}}, f)
    got = _torch_load(f)
    assert isinstance(got["a"], Opaque) and isinstance(got["b"], Opaque)
    assert torch.equal(got["t"], torch.ones(2)) and got["dt"] is torch.float16 and got["s"] == {1, 2}


# --- HF-style ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(gate_on_residual=True, qk_norm=True, tied=False)])
def test_hf_round_trip(tmp_path, kw):
    _, m = tiny(**kw)
    save_hf(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["MekiForCausalLM"] and cfg["model_type"] == "meki"
    for p in (tmp_path, tmp_path / "model.safetensors"):
        ck = load_checkpoint(p)
        assert ck.source_format == "hf" and ck.path == tmp_path
        assert_same(ck, m, torch.float32)
    save_hf(m, tmp_path / "bf", dtype=torch.bfloat16)
    assert_same(load_checkpoint(tmp_path / "bf"), m, torch.bfloat16)


def test_hf_sharded(tmp_path):
    _, m = tiny()
    save_hf(m, tmp_path)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[:10],
              "model-00002-of-00002.safetensors": names[10:]}
    for f, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / f))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(load_checkpoint(tmp_path), m, torch.float32)


# --- bad input -----------------------------------------------------------------------------------

def test_not_a_checkpoint(tmp_path):
    error(tmp_path / "nothing", "no such file")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint\n" * 20)
    error(tmp_path / "junk.bin", "not a checkpoint", "junk.bin")
    (tmp_path / "empty").mkdir()
    error(tmp_path / "empty", "not a checkpoint", "empty")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    error(tmp_path / "plain.pt", "not a checkpoint", "'args'")

    root = tmp_path / "ck"
    save_megatron(tiny()[1], root)
    (root / "latest_checkpointed_iteration.txt").write_text("2000")
    error(root, "iter_0002000", "missing")
    (root / "latest_checkpointed_iteration.txt").write_text("soon")
    error(root, "latest_checkpointed_iteration.txt", "soon")
    (root / "latest_checkpointed_iteration.txt").unlink()
    error(root, "latest_checkpointed_iteration.txt", "iter_0001000")


def test_unsupported_layouts(tmp_path):
    root = save_megatron(tiny()[1], tmp_path / "tp")
    it = root / "iter_0001000"
    (it / "mp_rank_00").rename(it / "mp_rank_00_000")
    (it / "mp_rank_01_000").mkdir()
    error(root, "unsupported", "mp_rank_00_000", "mp_rank_01_000")
    os.link(it / "mp_rank_00_000/model_optim_rng.pt", it / "mp_rank_01_000/model_optim_rng.pt")
    error(it / "mp_rank_01_000", "unsupported", "mp_rank_01_000")
    error(it / "mp_rank_00_000" / "model_optim_rng.pt", "unsupported", "mp_rank_00_000")

    dist = tmp_path / "dist" / "iter_0000010"
    dist.mkdir(parents=True)
    (dist / ".metadata").write_bytes(b"x")
    (dist / "__0_0.distcp").write_bytes(b"x")
    (dist.parent / "latest_checkpointed_iteration.txt").write_text("10")
    error(dist.parent, "unsupported", "torch_dist")

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        root = save_megatron(tiny()[1], tmp_path / name, **{name: 2})
        error(root, "unsupported", f"{name}=2")
    root = save_megatron(tiny()[1], tmp_path / "ln", normalization="LayerNorm")
    error(root, "unsupported", "normalization='LayerNorm'")
    root = save_megatron(tiny()[1], tmp_path / "vp")
    rewrite(root / PT, lambda ck: ck.update(model0=ck.pop("model")))
    error(root, "unsupported", "virtual-pipeline")


def test_missing_and_misshapen_tensors(tmp_path):
    root = save_megatron(tiny()[1], tmp_path / "a")
    key = "decoder.layers.1.meki_module.mix_norm.weight"
    rewrite(root / PT, lambda ck: ck["model"].pop(key))
    error(root, "missing tensor", key)

    root = save_megatron(tiny()[1], tmp_path / "b")
    key = L0 + "mlp.linear_fc2.weight"
    rewrite(root / PT, lambda ck: ck["model"].__setitem__(key, torch.zeros(64, 95)))
    error(root, "shape mismatch", key, "[64, 96]", "[64, 95]")

    root = save_megatron(tiny()[1], tmp_path / "c")
    rewrite(root / PT, lambda ck: ck["model"].__setitem__(L0 + "mlp.linear_fc1.bias", torch.zeros(192)))
    error(root, "unexpected tensor", L0 + "mlp.linear_fc1.bias")

    # a plain (non-MeKi) GPT: no meki tensors, no meki_dim
    root = save_megatron(tiny()[1], tmp_path / "d")
    def strip(ck):
        ck["model"] = {k: v for k, v in ck["model"].items() if "meki_module" not in k}
        del ck["args"].meki_dim
    rewrite(root / PT, strip)
    error(root, "missing tensor", "decoder.layers.0.meki_module.embeddings.weight")


@pytest.mark.parametrize("override,needles", [
    (dict(hidden_size=128), ["hidden_size=128", "[160, 128]", "[160, 64]"]),
    (dict(meki_dim=16), ["meki_dim=16", "[160, 16]", "[160, 32]"]),
    (dict(ffn_hidden_size=80), ["ffn_hidden_size=80", "[160, 64]", "[192, 64]"]),
    (dict(num_query_groups=4), ["num_query_groups=4", "[192, 64]", "[128, 64]"]),
    (dict(num_layers=3), ["args.num_layers=3", "2 layers"]),
    (dict(padded_vocab_size=192), ["args.padded_vocab_size=192", "160 rows"]),
    (dict(meki_dim=0), ["meki_dim=0", "not MeKi"]),
    (dict(transformer_impl="local"), ["transformer_impl='local'", "fused norms"]),
    (dict(untie_embeddings_and_output_weights=True), ["missing tensor output_layer.weight"]),
    (dict(qk_layernorm=False), ["unexpected tensor", "q_layernorm", "qk_layernorm=False"]),
    (dict(num_layers="2"), ["args.num_layers='2' is not an int"]),
    (dict(num_query_groups=3), ["4 heads are not a multiple of 3 KV heads"]),
])
def test_args_inconsistent_with_tensors(tmp_path, override, needles):
    _, m = tiny(gate_on_residual=True, qk_norm=True)
    error(save_megatron(m, tmp_path, **override), *needles)


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("where", ["args", "model", "bare pickle"])
@pytest.mark.parametrize("fn,ref", [(os.system, f"{os.system.__module__}.system"),
                                    (eval, "builtins.eval"),
                                    (__import__("subprocess").getoutput, "subprocess.getoutput")])
def test_code_running_pickle_is_refused(tmp_path, where, fn, ref):
    marker = tmp_path / "pwned"
    cmd = f"open({str(marker)!r}, 'w')" if fn is eval else f"touch {marker}"
    root = save_megatron(tiny()[1], tmp_path / "ck")
    if where == "bare pickle":           # not torch's zip format: the legacy reader, same unpickler
        (root / PT).write_bytes(pickle.dumps(_Evil(fn, cmd), protocol=2))
    elif where == "args":
        rewrite(root / PT, lambda ck: setattr(ck["args"], "hook", _Evil(fn, cmd)))
    else:
        rewrite(root / PT, lambda ck: ck["model"].__setitem__("x._extra_state", _Evil(fn, cmd)))
    error(root, "refusing to load", ref)
    assert not marker.exists()


def test_codec_lookup_is_refused(tmp_path):
    # _codecs.encode is allowed for protocol-2 bytes, but another codec name would import a module
    f = tmp_path / "x.pt"
    f.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    error(f, "refusing to load", "rot13")


def test_hf_errors(tmp_path):
    _, m = tiny()

    def fresh(name):
        d = tmp_path / name
        save_hf(m, d)
        return d

    d = fresh("noconfig")
    (d / "config.json").unlink()
    error(d, "config.json")

    d = fresh("unknown")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": 2}))
    error(d, "unknown keys", "rope_scaling")
    del cfg["d_mem"]
    (d / "config.json").write_text(json.dumps(cfg))
    error(d, "missing keys", "d_mem")
    (d / "config.json").write_text(json.dumps({**cfg, "d_mem": 32, "n_head": 4.5}))
    error(d, "n_head=4.5 is not an int")
    (d / "config.json").write_text(json.dumps({**cfg, "d_mem": 0}))
    error(d, "d_mem=0 must be positive")
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3"}))
    error(d, "not a MeKi config", "qwen3")
    (d / "config.json").write_text("{")
    error(d, "config.json", "JSON")

    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    d = fresh("extra")
    save_file({**sd, "model.layers.0.mlp.bias": torch.zeros(3)}, str(d / "model.safetensors"))
    error(d, "unknown tensor", "model.layers.0.mlp.bias")

    d = fresh("missing")
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.meki.beta"}, str(d / "model.safetensors"))
    error(d, "missing tensor", "model.layers.1.meki.beta")

    d = fresh("shape")
    save_file({**sd, "model.layers.0.meki.out_proj.weight": torch.zeros(64, 31)}, str(d / "model.safetensors"))
    error(d, "shape mismatch", "model.layers.0.meki.out_proj.weight", "[64, 32]", "[64, 31]")

    d = fresh("corrupt")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    error(d, "safetensors")

    d = fresh("nothing")
    (d / "model.safetensors").unlink()
    error(d, "model.safetensors")
