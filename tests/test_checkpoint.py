"""Reading checkpoints (meki_gguf/checkpoint/): both layouts round-trip, the official Megatron
layout is written and decoded right, and every bad input is a one-line MekiError."""
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

from meki_gguf.checkpoint import load_checkpoint, save_hf, save_megatron
from meki_gguf.checkpoint.megatron import _unpack
from meki_gguf.checkpoint.unpickle import Opaque
from meki_gguf.checkpoint.unpickle import torch_load as _torch_load
from meki_gguf.errors import MekiError
from meki_gguf.model import MekiConfig, MekiForCausalLM, init_random

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
    ck["model"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ck["model"].items()}
    edit(ck)
    tmp = file.with_suffix(".tmp")
    torch.save(ck, tmp)
    os.replace(tmp, file)


# --- Megatron: round trip --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dyn_norm", [True, False])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_megatron_round_trip(tmp_path, dtype, dyn_norm, qk_norm, tied):
    _, m = tiny(dyn_norm=dyn_norm, qk_norm=qk_norm, tied=tied)
    root = save_megatron(m, tmp_path / "ck", dtype=dtype)
    ck = load_checkpoint(root)
    assert ck.source_format == "megatron" and ck.path == root / PT
    assert_same(ck, m, dtype)


# The state dict of the official code, written here from its files (ningding-o/MeKi @ a196d7a,
# Megatron-LM/megatron/core/transformer/transformer_layer.py: TransformerLayer.__init__, MeKi.__init__;
# megatron/core/models/gpt/gpt_layer_specs.py; transformer_block.py), not from our reader: one
# layer's keys per spec, without QK-norm, with the kind of `_extra_state` each module writes
# ("te": a Transformer Engine module's, "none": a Megatron linear's None).
OFFICIAL_LAYER = {
    "transformer_engine": {
        "self_attention.linear_qkv.layer_norm_weight": "w",   # TELayerNormColumnParallelLinear (spec)
        "self_attention.linear_qkv.weight": "w",
        "self_attention.linear_qkv._extra_state": "te",
        "self_attention.core_attention._extra_state": "te",   # TEDotProductAttention
        "self_attention.linear_proj.weight": "w",             # TERowParallelLinear
        "self_attention.linear_proj._extra_state": "te",
        "pre_mlp_layernorm.weight": "w",                      # te RMSNorm built by TransformerLayer
        "pre_mlp_layernorm._extra_state": "te",
        "mlp.linear_fc1.weight": "w",                         # swapped for TEColumnParallelLinear
        "mlp.linear_fc1._extra_state": "te",
        "mlp.linear_fc2.weight": "w",                         # TERowParallelLinear (spec)
        "mlp.linear_fc2._extra_state": "te",
        "meki_module.mix_norm.weight": "w", "meki_module.mix_norm._extra_state": "te",
        "meki_module.alpha_scale": "w", "meki_module.beta_scale": "w",
        "meki_module.word_emb_projection.linear_fc1.layer_norm_weight": "w",   # the spec's MLP: TE, fused norm
        "meki_module.word_emb_projection.linear_fc1.weight": "w",
        "meki_module.word_emb_projection.linear_fc1._extra_state": "te",
        "meki_module.word_emb_projection.linear_fc2.weight": "w",
        "meki_module.word_emb_projection.linear_fc2._extra_state": "te",
        "meki_module.embeddings.weight": "w",                 # VocabParallelEmbedding
        "meki_module.gate_proj.weight": "w", "meki_module.gate_proj._extra_state": "te",
        "meki_module.out_proj.weight": "w", "meki_module.out_proj._extra_state": "te",
        "meki_module.post_norm.weight": "w", "meki_module.post_norm._extra_state": "te",
    },
    "local": {
        "input_layernorm.weight": "w",                        # WrappedTorchNorm (torch RMSNorm)
        "self_attention.linear_qkv.weight": "w",              # ColumnParallelLinear
        "self_attention.linear_qkv._extra_state": "none",
        "self_attention.linear_proj.weight": "w",             # RowParallelLinear; core attention has no state
        "self_attention.linear_proj._extra_state": "none",
        "pre_mlp_layernorm.weight": "w", "pre_mlp_layernorm._extra_state": "te",
        "mlp.linear_fc1.weight": "w", "mlp.linear_fc1._extra_state": "te",
        "mlp.linear_fc2.weight": "w", "mlp.linear_fc2._extra_state": "none",
        "meki_module.mix_norm.weight": "w", "meki_module.mix_norm._extra_state": "te",
        "meki_module.alpha_scale": "w", "meki_module.beta_scale": "w",
        "meki_module.word_emb_projection.linear_fc1.weight": "w",             # the spec's MLP: no norm
        "meki_module.word_emb_projection.linear_fc1._extra_state": "none",
        "meki_module.word_emb_projection.linear_fc2.weight": "w",
        "meki_module.word_emb_projection.linear_fc2._extra_state": "none",
        "meki_module.embeddings.weight": "w",
        "meki_module.gate_proj.weight": "w", "meki_module.gate_proj._extra_state": "te",
        "meki_module.out_proj.weight": "w", "meki_module.out_proj._extra_state": "te",
        "meki_module.post_norm.weight": "w", "meki_module.post_norm._extra_state": "te",
    },
}
# TransformerBlock's final norm is TENorm whenever TE is installed (as MeKi needs), in both specs;
# the output layer is Megatron's linear: its None extra state even when tied (no weight then)
OFFICIAL_GLOBAL = {"embedding.word_embeddings.weight": "w", "decoder.final_layernorm.weight": "w",
                   "decoder.final_layernorm._extra_state": "te", "output_layer._extra_state": "none"}
# --qk-layernorm adds TENorm (TE spec) or a torch RMSNorm (local) for queries and keys
OFFICIAL_QK = {"transformer_engine": {"self_attention.q_layernorm.weight": "w", "self_attention.q_layernorm._extra_state": "te",
                                      "self_attention.k_layernorm.weight": "w", "self_attention.k_layernorm._extra_state": "te"},
               "local": {"self_attention.q_layernorm.weight": "w", "self_attention.k_layernorm.weight": "w"}}


def official_keys(impl: str, n_layer: int, qk_norm: bool = False, tied: bool = True) -> dict[str, str]:
    keys = dict(OFFICIAL_GLOBAL)
    for i in range(n_layer):
        layer = {**OFFICIAL_LAYER[impl], **(OFFICIAL_QK[impl] if qk_norm else {})}
        keys.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
    if not tied:
        keys["output_layer.weight"] = "w"
    return keys


@pytest.mark.parametrize("qk_norm,tied", [(False, True), (True, False)], ids=["released", "qk-untied"])
@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_megatron_keys_are_the_official_ones(tmp_path, impl, qk_norm, tied):
    """save_megatron writes exactly the official state dict of a 2-layer model: every key, and
    each `_extra_state` as the module that owns it writes it (TE 2.x: a uint8 tensor)."""
    _, m = tiny(dyn_norm=impl == "transformer_engine", qk_norm=qk_norm, tied=tied)
    sd = _torch_load(save_megatron(m, tmp_path) / PT)["model"]
    want = official_keys(impl, 2, qk_norm, tied)
    assert sorted(sd) == sorted(want)
    for k, kind in want.items():
        v = sd[k]
        if kind == "w":
            assert isinstance(v, torch.Tensor) and v.is_floating_point(), k
        elif kind == "te":
            assert isinstance(v, torch.Tensor) and v.dtype == torch.uint8, k
        else:
            assert v is None, k


@pytest.mark.parametrize("form", ["te2", "te2-fp8", "te1"])
@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_every_extra_state_form_reads(tmp_path, impl, form):
    """TE 2.x without and with FP8 metadata (uint8 tensors, empty or not) and TE 1.x (a BytesIO,
    and no extra state for its RMSNorm): the same model comes out."""
    _, m = tiny(dyn_norm=impl == "transformer_engine", qk_norm=True)
    root = save_megatron(m, tmp_path, dtype=torch.float32, extra_state=form)
    sd = _torch_load(root / PT)["model"]
    extra = {type(v).__name__ for k, v in sd.items() if k.endswith("._extra_state") and v is not None}
    assert extra == ({"BytesIO"} if form == "te1" else {"Tensor"})        # BytesIO: an inert placeholder
    assert_same(load_checkpoint(root), m, torch.float32)


def test_megatron_file_is_official(tmp_path):
    """The saved file looks like the released training code's: args with a Megatron enum, numpy
    RNG state; and megatron is not left importable."""
    _, m = tiny(dyn_norm=True, tied=False)
    file = save_megatron(m, tmp_path) / PT
    assert "megatron" not in sys.modules
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1000"
    with zipfile.ZipFile(file) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"megatron.core.enums" in pkl and b"ModelType" in pkl and b"numpy" in pkl

    raw = _torch_load(file)
    sd, args = raw["model"], raw["args"]
    assert sd[L0 + "meki_module.alpha_scale"].shape == ()
    assert isinstance(args, argparse.Namespace) and args.meki_dim == 32
    assert args.transformer_impl == "transformer_engine" and args.params_dtype is torch.bfloat16
    assert isinstance(args.model_type, Opaque)
    assert args.model_type.ref == "megatron.core.enums.ModelType" and args.model_type.args == (1,)
    np_state = raw["rng_state"][0]["np_rng_state"]
    assert np_state[0] == "MT19937" and isinstance(np_state[1], Opaque)   # an inert ndarray


def test_the_gate_and_the_ffn_see_one_normed_state(tmp_path):
    """Megatron's names map where the official forward uses them: pre_mlp_layernorm is the one norm
    before the FFN and the MeKi gate (ours: post_attention_layernorm); G's fused input norm is
    meki.dyn.norm; the attention norm is fused (TE) or not (local)."""
    for impl, te in (("transformer_engine", True), ("local", False)):
        _, m = tiny(dyn_norm=te)
        raw = _torch_load(save_megatron(m, tmp_path / impl, dtype=torch.float32) / PT)["model"]
        ck = load_checkpoint(tmp_path / impl).tensors
        pairs = {"pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
                 ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"):
                     "input_layernorm.weight"}
        if te:
            pairs["meki_module.word_emb_projection.linear_fc1.layer_norm_weight"] = "meki.dyn.norm.weight"
        for mg, ours in pairs.items():
            assert torch.equal(raw[L0 + mg], ck["model.layers.0." + ours]), (impl, mg)
        assert ("model.layers.0.meki.dyn.norm.weight" in ck) == te


def official_forward(sd: dict, args, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] of the official fork's GPTModel on the raw Megatron state dict, float64,
    written from its code and using no meki_gguf code (ningding-o/MeKi @ a196d7a: transformer_layer.py
    TransformerLayer._forward_attention / _forward_mlp and MeKi.forward; attention.py SelfAttention
    (QKV grouped per query group); mlp.py (SwiGLU: silu of the first half of fc1 times the second);
    rotary_pos_embedding.py (rotate-half)). The arbiter of what our map from Megatron names means."""
    te = args.transformer_impl == "transformer_engine"
    eps, nq, ng, hd = args.norm_epsilon, args.num_attention_heads, args.num_query_groups, args.kv_channels
    W = {k: v.double() for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}

    def rms(x, w):                                       # TE/torch RMSNorm, zero_centered_gamma off
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def swiglu(x, fc1, fc2):
        a, b = (x @ fc1.T).chunk(2, -1)
        return (torch.nn.functional.silu(a) * b) @ fc2.T

    T = len(ids)
    inv = 1.0 / args.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([torch.arange(T, dtype=torch.float64)[:, None] * inv] * 2, -1)

    def rope(t):                                         # [heads, T, hd]
        return t * ang.cos() + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * ang.sin()

    word_emb = W["embedding.word_embeddings.weight"][ids]   # the embedding's output, fed to every MeKi
    x = word_emb
    for i in range(args.num_layers):
        w = {k.removeprefix(f"decoder.layers.{i}."): v for k, v in W.items() if k.startswith(f"decoder.layers.{i}.")}
        h = rms(x, w["self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"])
        qkv = (h @ w["self_attention.linear_qkv.weight"].T).view(T, ng, nq // ng + 2, hd)
        q, k, v = qkv[:, :, :-2].reshape(T, nq, hd), qkv[:, :, -2], qkv[:, :, -1]
        if args.qk_layernorm:
            q, k = rms(q, w["self_attention.q_layernorm.weight"]), rms(k, w["self_attention.k_layernorm.weight"])
        q, k, v = rope(q.transpose(0, 1)), rope(k.transpose(0, 1)), v.transpose(0, 1)
        k, v = k.repeat_interleave(nq // ng, 0), v.repeat_interleave(nq // ng, 0)
        att = (q @ k.transpose(1, 2)) / hd ** 0.5 + torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
        A = x + (att.softmax(-1) @ v).transpose(0, 1).reshape(T, -1) @ w["self_attention.linear_proj.weight"].T
        H = rms(A, w["pre_mlp_layernorm.weight"])        # TransformerLayer's own pre-MLP norm, both specs
        mlp = swiglu(H, w["mlp.linear_fc1.weight"], w["mlp.linear_fc2.weight"])
        m = "meki_module."                               # MeKi.forward(hidden_states=H, input_ids, word_emb)
        g_in = rms(word_emb, w[m + "word_emb_projection.linear_fc1.layer_norm_weight"]) if te else word_emb
        dynamic = swiglu(g_in, w[m + "word_emb_projection.linear_fc1.weight"], w[m + "word_emb_projection.linear_fc2.weight"])
        meki = rms(w[m + "embeddings.weight"][ids] + dynamic * w[m + "beta_scale"], w[m + "mix_norm.weight"]) * w[m + "alpha_scale"]
        fused = torch.sigmoid(H @ w[m + "gate_proj.weight"].T) + meki
        x = A + mlp + rms(fused @ w[m + "out_proj.weight"].T, w[m + "post_norm.weight"])
    x = rms(x, W["decoder.final_layernorm.weight"])
    return x @ W.get("output_layer.weight", W["embedding.word_embeddings.weight"]).T


@pytest.mark.parametrize("qk_norm,tied", [(False, True), (True, False)], ids=["released", "qk-untied"])
@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_our_reading_computes_the_official_forward(tmp_path, impl, qk_norm, tied):
    """The model our reader builds from an official-layout file gives the logits of the official
    forward run on that file's raw tensors: the map from Megatron names is what the official code
    means by them, not only what our writer and reader agree on."""
    _, m = tiny(dyn_norm=impl == "transformer_engine", qk_norm=qk_norm, tied=tied)
    root = save_megatron(m, tmp_path, dtype=torch.float32)
    raw = _torch_load(root / PT)
    ids = torch.randint(0, TINY.vocab_size, (13,), generator=torch.Generator().manual_seed(0))
    want = official_forward(raw["model"], raw["args"], ids)
    ck = load_checkpoint(root)
    ours = MekiForCausalLM(ck.config).double()
    ours.load_state_dict({k: v.double() for k, v in ck.tensors.items()})
    with torch.no_grad():
        got = ours(ids[None]).logits[0]
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"\n{impl} qk={qk_norm} tied={tied}: max relative logit error vs the official forward {err:.1e}")
    assert err < 1e-12


def test_our_old_misread_layout_is_refused_naming_the_official_keys(tmp_path):
    """meki-gguf 0.1 wrote (and read) the TE spec with the FFN norm fused into mlp.linear_fc1 and no
    pre_mlp_layernorm: no official code writes that. The error names the keys the layout has."""
    _, m = tiny(dyn_norm=True)
    root = save_megatron(m, tmp_path)

    def misread(ck):
        sd = ck["model"]
        for i in range(2):
            sd[f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"] = sd.pop(f"decoder.layers.{i}.pre_mlp_layernorm.weight")
            del sd[f"decoder.layers.{i}.pre_mlp_layernorm._extra_state"]
    rewrite(root / PT, misread)
    msg = error(root, "missing tensor decoder.layers.0.pre_mlp_layernorm.weight (and 1 more)",
                "unexpected tensor 'decoder.layers.0.mlp.linear_fc1.layer_norm_weight' (and 1 more)",
                "not the MeKi fork's layout for args.transformer_impl='transformer_engine'",
                "self_attention.linear_qkv.layer_norm_weight, self_attention.linear_qkv.weight")
    print(f"\n{msg}")


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

@pytest.mark.parametrize("kw", [dict(), dict(dyn_norm=True, qk_norm=True, tied=False)])
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
    _, m = tiny(dyn_norm=True, qk_norm=True)
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
