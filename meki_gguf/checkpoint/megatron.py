"""The official Megatron-LM layout (`--ckpt-format torch`, TP=1, PP=1) of the MeKi fork:
`iter_NNNNNNN/mp_rank_00/model_optim_rng.pt`, read lazily (memory-mapped; a fused Megatron
tensor, grouped QKV or gate|up, is split into views) and written (`save_megatron`: tests, demo).

The layout is the official code's, not ours: the tables below cite the fork's files, and the tests
check the key sets against tables written from those files (tests/test_checkpoint.py).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import enum
import io
import random
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch

from ..errors import MekiError
from ..model import MekiConfig, MekiForCausalLM
from .base import Checkpoint, LazyTensors, brief, checked, reference_shapes, typed
from .unpickle import torch_load


_TRACKER = "latest_checkpointed_iteration.txt"
_MP_RANK = re.compile(r"mp_rank_\d+(_\d+)*$")


def megatron_file(p: Path) -> Path:
    """Resolve a checkpoint root, iteration folder, mp_rank_00 folder or the .pt file itself."""
    if p.is_file():
        if _MP_RANK.match(p.parent.name) and p.parent.name != "mp_rank_00":
            raise _unsupported_parallel(p.parent.parent, [p.parent.name])
        return p
    if (p / _TRACKER).is_file():
        with open(p / _TRACKER, "rb") as f:        # a few bytes: it is a number or "release"
            text = f.read(64).decode("utf-8", "replace").strip()
        if text == "release":
            p = p / "release"
        elif re.fullmatch(r"[0-9]{1,12}", text):   # str.isdigit() takes "²", which int() refuses
            p = p / f"iter_{int(text):07d}"
        else:
            raise MekiError(f"{p / _TRACKER}: expected an iteration number or 'release', got {text[:40]!r}")
        if not p.is_dir():
            raise MekiError(f"not a checkpoint: {p.parent / _TRACKER} names {text}, but {p} is missing")
    if (p / "model_optim_rng.pt").is_file():      # an mp_rank folder
        if _MP_RANK.match(p.name) and p.name != "mp_rank_00":
            raise _unsupported_parallel(p.parent, [p.name])
        return p / "model_optim_rng.pt"
    if (p / ".metadata").exists() or any(p.glob("*.distcp")):
        raise MekiError(f"unsupported: {p} is a distributed (torch_dist) Megatron checkpoint; "
                        f"re-save it with --ckpt-format torch")
    ranks = sorted(d.name for d in p.iterdir() if d.is_dir() and _MP_RANK.match(d.name))
    if ranks:
        if ranks != ["mp_rank_00"]:
            raise _unsupported_parallel(p, ranks)
        if not (p / "mp_rank_00" / "model_optim_rng.pt").is_file():
            raise MekiError(f"not a checkpoint: {p / 'mp_rank_00'} has no model_optim_rng.pt")
        return p / "mp_rank_00" / "model_optim_rng.pt"
    iters = sorted(d.name for d in p.iterdir() if d.is_dir() and re.match(r"iter_\d+$", d.name))
    if iters:
        raise MekiError(f"not a checkpoint: {p} has no {_TRACKER}; pass one of its folders "
                        f"({', '.join(iters[:3])}{', ...' if len(iters) > 3 else ''})")
    raise MekiError(f"not a checkpoint: {p} holds neither config.json (Hugging Face-style) nor "
                    f"{_TRACKER}, iter_*/mp_rank_00/ or model_optim_rng.pt (Megatron-LM)")


def _unsupported_parallel(where: Path, ranks: list[str]) -> MekiError:
    return MekiError(f"unsupported: {where} is a tensor/pipeline-parallel Megatron checkpoint "
                     f"({', '.join(ranks)}); only TP=1, PP=1 (a single mp_rank_00) is supported")


# The official layout, read from the MeKi fork of Megatron-LM (ningding-o/MeKi, commit a196d7a):
# Megatron-LM/megatron/core/transformer/transformer_layer.py (classes TransformerLayer and MeKi) and
# megatron/core/models/gpt/gpt_layer_specs.py. What the spec (--transformer-impl) changes is only
# where two norms live:
# - TransformerLayer ignores the spec's pre-MLP norm: it always builds an explicit TE RMSNorm,
#   `pre_mlp_layernorm`, and swaps the FFN's first linear for a TE linear without a fused norm.
#   Its output H goes to the FFN and to the MeKi module, whose gate reads it: in both specs.
# - the attention input norm: fused into `linear_qkv` (TE spec) or `input_layernorm` (local);
# - MeKi's G_l (`word_emb_projection`) is built from the spec's own MLP submodules: with the TE
#   spec its first linear has a fused input RMSNorm on the word embedding; with local, none.
#   (Megatron name, (our names...), packing)    packing: None | "qkv" | "cat" (gate rows, up rows)
def _layer_map(te: bool) -> list[tuple[str, tuple[str, ...], str | None]]:
    return [
        ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight",
         ("input_layernorm.weight",), None),
        ("self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
        ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), None),
        ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), None),
        ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), None),
        ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), None),
        ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "cat"),
        ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), None),
        ("meki_module.embeddings.weight", ("meki.memory.weight",), None),
        ("meki_module.word_emb_projection.linear_fc1.layer_norm_weight", ("meki.dyn.norm.weight",), None),
        ("meki_module.word_emb_projection.linear_fc1.weight",
         ("meki.dyn.gate_proj.weight", "meki.dyn.up_proj.weight"), "cat"),
        ("meki_module.word_emb_projection.linear_fc2.weight", ("meki.dyn.down_proj.weight",), None),
        ("meki_module.mix_norm.weight", ("meki.mix_norm.weight",), None),
        ("meki_module.alpha_scale", ("meki.alpha",), None),
        ("meki_module.beta_scale", ("meki.beta",), None),
        ("meki_module.gate_proj.weight", ("meki.gate_proj.weight",), None),
        ("meki_module.out_proj.weight", ("meki.out_proj.weight",), None),
        ("meki_module.post_norm.weight", ("meki.post_norm.weight",), None),
    ]


_GLOBAL_MAP = [
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), None),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), None),
    ("output_layer.weight", ("lm_head.weight",), None),
]


def _megatron_map(c: MekiConfig, have) -> list[tuple[str, tuple[str, ...], str | None]]:
    """Full-name map for config c, keeping the entries whose names its reference model `have`s
    (QK-norm, G's input norm, an untied output). The TE spec's iff G has its input norm."""
    out = _GLOBAL_MAP[:1]                         # Megatron's order: embedding, layers, final norm, output
    for i in range(c.n_layer):
        for mg, ours, pack in _layer_map(c.dyn_norm):
            out.append((f"decoder.layers.{i}.{mg}", tuple(f"model.layers.{i}.{n}" for n in ours), pack))
    out += _GLOBAL_MAP[1:]
    return [e for e in out if all(n in have for n in e[1])]


# The modules with an `_extra_state` entry (bookkeeping, not weights). Transformer Engine's modules
# write theirs (TE 2.x: a uint8 tensor, empty without FP8, its RMSNorm too; TE 1.x: a BytesIO, none
# for its RMSNorm); Megatron's own linears write None. TE modules in both specs: the RMSNorms that
# TransformerLayer and MeKi build themselves, the FFN's swapped first linear, MeKi's gate and output
# projections, and the final norm (TransformerBlock's TENorm whenever TE is installed, as MeKi needs).
_TE_NORMS_BOTH = ["pre_mlp_layernorm", "meki_module.mix_norm", "meki_module.post_norm"]
_TE_LINEARS_BOTH = ["mlp.linear_fc1", "meki_module.gate_proj", "meki_module.out_proj"]
# the spec's own modules: TE's with the TE spec, Megatron's (None) with local; the local spec's
# QK norms are torch RMSNorms (no extra state), its core attention Megatron's (none either)
_SPEC_LINEARS = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc2",
                 "meki_module.word_emb_projection.linear_fc1", "meki_module.word_emb_projection.linear_fc2"]
EXTRA_STATE_FORMS = ("te2", "te2-fp8", "te1")


def _extra_state(c: MekiConfig, form: str) -> dict[str, object]:
    """The `_extra_state` entries of the official state dict of c, in the given TE version's form."""
    if form not in EXTRA_STATE_FORMS:
        raise ValueError(f"extra_state form {form!r}: one of {EXTRA_STATE_FORMS}")
    te = c.dyn_norm
    linear = {"te2": lambda: torch.empty(0, dtype=torch.uint8),
              "te2-fp8": lambda: torch.arange(64, dtype=torch.uint8),      # stand-in for pickled FP8 metadata
              "te1": lambda: io.BytesIO(b"\x80\x04N.")}[form]
    norm = None if form == "te1" else linear                                # TE 1.x RMSNorm: no extra state
    per_layer = [(m, linear) for m in _TE_LINEARS_BOTH] + [(m, norm) for m in _TE_NORMS_BOTH]
    if te:
        per_layer += [(m, linear) for m in _SPEC_LINEARS + ["self_attention.core_attention"]]
        if c.qk_norm:
            per_layer += [(m, norm) for m in ("self_attention.q_layernorm", "self_attention.k_layernorm")]
    else:
        per_layer += [(m, lambda: None) for m in _SPEC_LINEARS]
    out = {f"decoder.layers.{i}.{m}._extra_state": make() for i in range(c.n_layer) for m, make in per_layer if make}
    if norm:
        out["decoder.final_layernorm._extra_state"] = norm()
    out["output_layer._extra_state"] = None                                 # Megatron's linear, tied or not
    return out


def _pack(pack: str | None, parts: list[torch.Tensor], c: MekiConfig) -> torch.Tensor:
    """Our tensors -> the Megatron tensor. Works on meta tensors (shape checks)."""
    if pack is None:
        return parts[0]
    if pack == "cat":
        return torch.cat(parts, 0)
    q, k, v = parts           # grouped per KV group: [the group's q heads | its k head | its v head]
    g, hd, d = c.n_kv_head, c.head_dim, c.d_model
    return torch.cat([q.reshape(g, -1, hd, d), k.reshape(g, 1, hd, d), v.reshape(g, 1, hd, d)], 1).reshape(-1, d)


def _unpack(pack: str | None, t: torch.Tensor, c: MekiConfig) -> tuple[torch.Tensor, ...]:
    """The Megatron tensor -> our tensors (views where the memory layout allows); inverse of _pack."""
    if pack is None:
        return (t,)
    if pack == "cat":
        return tuple(t.chunk(2, 0))
    g, hd, d = c.n_kv_head, c.head_dim, c.d_model
    w = t.reshape(g, -1, hd, d)                   # [group, q heads + k + v, hd, d]
    rep = w.shape[1] - 2
    return w[:, :rep].reshape(-1, d), w[:, rep].reshape(-1, d), w[:, rep + 1].reshape(-1, d)


# Args a converted checkpoint must have (name, required value): a Qwen3-shaped decoder.
_REQUIRED_ARGS = [
    ("normalization", "RMSNorm"), ("swiglu", True), ("add_bias_linear", False),
    ("add_qkv_bias", False), ("position_embedding_type", "rope"), ("rotary_percent", 1.0),
    ("rotary_interleaved", False), ("use_rope_scaling", False), ("apply_layernorm_1p", False),
]
_MISSING = object()


def load_megatron(file: Path) -> Checkpoint:
    ck = torch_load(file)
    if not isinstance(ck, dict) or not isinstance(ck.get("args"), argparse.Namespace):
        raise MekiError(f"not a checkpoint: {file} has no Megatron 'args' (a {type(ck).__name__}"
                        f"{' with keys ' + brief(list(ck)[:6]) if isinstance(ck, dict) else ''})")
    args = ck["args"]
    if "model" not in ck:
        if "model0" in ck:
            raise MekiError(f"unsupported: {file} is a virtual-pipeline checkpoint (model0, model1, ...)")
        raise MekiError(f"not a checkpoint: {file} has no 'model' state dict")
    if not isinstance(ck["model"], dict):
        raise MekiError(f"not a checkpoint: {file}: 'model' is a {type(ck['model']).__name__}, not a state dict")
    for k in ck["model"]:
        if not isinstance(k, str):
            raise MekiError(f"not a checkpoint: {file}: the state dict has a key {brief(k)}, not a name")
    sd = {k: v for k, v in ck["model"].items() if not k.endswith("_extra_state")}   # TE bookkeeping
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise MekiError(f"{file}: {brief(k)} is not a tensor (a {type(v).__name__})")

    config = _megatron_config(args, sd, file)
    summary = _args_summary(config)
    meta = reference_shapes(config, f"{file}: the args")
    entries = _megatron_map(config, meta)
    expected = {mg: _pack(p, [torch.empty(meta[n], device="meta") for n in ours], config).shape
                for mg, ours, p in entries}          # meta shapes: reference_shapes built them
    missing, extra = [k for k in expected if k not in sd], [k for k in sd if k not in expected]
    if missing or extra:
        raise MekiError(_layout_error(file, config, expected, missing, extra))
    for mg, shape in expected.items():
        if list(sd[mg].shape) != list(shape):
            raise MekiError(f"{file}: shape mismatch for {mg}: expected {list(shape)} from the args "
                            f"({summary}), got {list(sd[mg].shape)}")

    loaders = {}
    for mg, ours, p in entries:
        for j, n in enumerate(ours):
            loaders[n] = lambda mg=mg, p=p, j=j: _unpack(p, sd[mg], config)[j]
    loaders = {n: loaders[n] for n in meta}       # the reference order
    return Checkpoint(config, LazyTensors(loaders), "megatron", file)


def _layout_error(file: Path, c: MekiConfig, expected, missing: list[str], extra: list[str]) -> str:
    """What is missing and what is extra, and the names the official layout has per layer."""
    got = []
    if missing:
        got.append(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:                                            # the file's own names: quoted (brief)
        got.append(f"unexpected tensor {brief(extra[0])}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    got = ", ".join(got)
    layer = [k.removeprefix("decoder.layers.0.") for k in expected if k.startswith("decoder.layers.0.")]
    return (f"{file}: {got}: not the MeKi fork's layout for args.transformer_impl={_impl(c)!r} "
            f"(qk_layernorm={c.qk_norm}), whose every layer has {', '.join(layer)}")


def _megatron_config(args: argparse.Namespace, sd: dict, file: Path) -> MekiConfig:
    def arg(name, kind=None, default=_MISSING):
        v = getattr(args, name, None)              # Megatron leaves unset options at None
        if v is None:
            if default is _MISSING:
                raise MekiError(f"{file}: the checkpoint's args lack {name}")
            return default
        return typed(v, kind, f"{file}: args.{name}") if kind else v

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if arg(name, int, 1) > 1:
            raise MekiError(f"unsupported: {file} was saved with {name}={arg(name)}; "
                            f"only TP=1, PP=1 checkpoints are supported")
    for name, want in _REQUIRED_ARGS:
        v = arg(name, None, want)
        # compared as plain values: `!=` on a tensor (or anything a pickle holds) is no bool
        if not (type(v) is type(want) or type(v) is int and type(want) is float) or v != want:
            raise MekiError(f"unsupported: {file} has args.{name}={brief(v)}; MeKi GGUF needs {want!r}")

    # the spec decides where the attention norm and G's input norm live (_layer_map); the keys
    # say it too, and must agree with the args
    te_keys = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in sd
    impl = arg("transformer_impl", None, "transformer_engine" if te_keys else "local")
    if not isinstance(impl, str) or impl not in ("transformer_engine", "local"):
        raise MekiError(f"unsupported: {file} has args.transformer_impl={brief(impl)}")
    te = impl == "transformer_engine"
    if te != te_keys:
        raise MekiError(f"{file}: args.transformer_impl={impl!r} but the tensors "
                        f"{'lack' if te else 'have'} Transformer Engine's fused norms "
                        f"(decoder.layers.0.self_attention.linear_qkv.layer_norm_weight)")

    emb_key, mem_key = "embedding.word_embeddings.weight", "decoder.layers.0.meki_module.embeddings.weight"
    if emb_key not in sd:
        raise MekiError(f"{file}: missing tensor {emb_key}")
    vocab = sd[emb_key].shape[0] if sd[emb_key].dim() else 0   # the padded vocabulary
    d_mem = arg("meki_dim", int, None)
    if d_mem is None:                 # args from a Megatron without the MeKi patch
        if mem_key not in sd:
            raise MekiError(f"{file}: missing tensor {mem_key} (no args.meki_dim either: "
                            f"not a MeKi checkpoint)")
        if sd[mem_key].dim() != 2:
            raise MekiError(f"{file}: {mem_key} has shape {list(sd[mem_key].shape)}, expected [vocab, meki_dim]")
        d_mem = sd[mem_key].shape[-1]
    if d_mem == 0:
        raise MekiError(f"{file}: args.meki_dim=0: a plain Megatron GPT checkpoint, not MeKi")

    d, heads = arg("hidden_size", int), arg("num_attention_heads", int)
    c = checked(MekiConfig(
        vocab_size=vocab, n_layer=arg("num_layers", int), d_model=d, d_mem=d_mem,
        d_ff=arg("ffn_hidden_size", int), n_head=heads,
        n_kv_head=arg("num_query_groups", int) if arg("group_query_attention", bool, False) else heads,
        head_dim=arg("kv_channels", int, d // max(heads, 1)),
        rope_theta=arg("rotary_base", float, 10000.0), norm_eps=arg("norm_epsilon", float),
        qk_norm=arg("qk_layernorm", bool, False),
        tied=not arg("untie_embeddings_and_output_weights", bool, False),
        dyn_norm=te,
        max_seq_len=arg("max_position_embeddings", int, None) or arg("seq_length", int, MekiConfig.max_seq_len),
    ), f"{file}: the args")

    padded = arg("padded_vocab_size", int, vocab)
    if padded != vocab:
        raise MekiError(f"{file}: args.padded_vocab_size={padded} but {emb_key} has {vocab} rows")
    # ASCII digits, few of them: int() refuses 4300+ digits (other keys are then "unexpected")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.layers\.([0-9]{1,9})\.", k))})
    if len(layers) != c.n_layer or layers != list(range(len(layers))):     # n_layer from the file: no range() of it
        span = f" (decoder.layers.{layers[0]}-{layers[-1]})" if layers else ""
        raise MekiError(f"{file}: args.num_layers={c.n_layer} but the checkpoint holds {len(layers)} layers{span}")
    return c


def _args_summary(c: MekiConfig) -> str:
    return (f"num_layers={c.n_layer} hidden_size={c.d_model} ffn_hidden_size={c.d_ff} "
            f"num_attention_heads={c.n_head} num_query_groups={c.n_kv_head} kv_channels={c.head_dim} "
            f"meki_dim={c.d_mem} vocab={c.vocab_size} qk_layernorm={c.qk_norm} "
            f"untie_embeddings_and_output_weights={not c.tied} "
            f"transformer_impl={_impl(c)}")


def _impl(c: MekiConfig) -> str:
    return "transformer_engine" if c.dyn_norm else "local"


# ---------------------------------------------------------------------------------------------
# Writing the official layout (tests, demo)

class _ModelType(enum.Enum):
    """Stand-in for megatron.core.enums.ModelType, pickled under that name as Megatron does."""
    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4


_ModelType.__module__, _ModelType.__qualname__ = "megatron.core.enums", "ModelType"


@contextlib.contextmanager
def _fake_megatron_modules():
    """Make `megatron.core.enums.ModelType` importable for the pickler, for the save only."""
    names = ["megatron", "megatron.core", "megatron.core.enums"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules["megatron.core.enums"].ModelType = _ModelType
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _theta_arg(theta: float):
    return int(theta) if float(theta).is_integer() else theta   # Megatron's --rotary-base is an int


def save_megatron(model: MekiForCausalLM, root: Path, iteration: int = 1000,
                  dtype=torch.bfloat16, extra_state: str = "te2", **arg_overrides) -> Path:
    """Write `root/iter_NNNNNNN/mp_rank_00/model_optim_rng.pt` + the tracker file, as the released
    training code (torch format, TP=PP=1) writes them: args Namespace with a Megatron enum, the
    official state dict with its `_extra_state` entries in the form of `extra_state`
    (EXTRA_STATE_FORMS), numpy/torch RNG state. The spec is Transformer Engine's iff
    model.config.dyn_norm (G's input norm exists only there); `arg_overrides` replace args (to
    craft bad files)."""
    c, root = model.config, Path(root)
    ours = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    sd = collections.OrderedDict()
    for mg, names, p in _megatron_map(c, ours):
        sd[mg] = _pack(p, [ours[n] for n in names], c).clone()   # own storage per tensor
    sd.update(_extra_state(c, extra_state))

    args = argparse.Namespace(
        num_layers=c.n_layer, hidden_size=c.d_model, ffn_hidden_size=c.d_ff,
        num_attention_heads=c.n_head, group_query_attention=c.n_kv_head != c.n_head,
        num_query_groups=c.n_kv_head, kv_channels=c.head_dim,
        max_position_embeddings=c.max_seq_len, seq_length=c.max_seq_len,
        position_embedding_type="rope", rotary_base=_theta_arg(c.rope_theta), rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=False, normalization="RMSNorm",
        norm_epsilon=c.norm_eps, apply_layernorm_1p=False, swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=c.qk_norm, untie_embeddings_and_output_weights=not c.tied,
        transformer_impl=_impl(c), use_mcore_models=True,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, sequence_parallel=False, ckpt_format="torch",
        padded_vocab_size=c.vocab_size, make_vocab_size_divisible_by=128,
        tokenizer_type="HuggingFaceTokenizer", bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, params_dtype=dtype, main_params_dtype=torch.float32,
        model_type=_ModelType.encoder_or_decoder, meki_dim=c.d_mem, iteration=iteration,
        consumed_train_samples=iteration * 256, seed=42,
    )
    for k, v in arg_overrides.items():
        setattr(args, k, v)
    rng = {
        "random_rng_state": random.Random(42).getstate(),
        "np_rng_state": np.random.RandomState(42).get_state(),   # numpy arrays and dtypes
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),                  # stand-in: no CUDA here
        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
    }
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": sd,
             "opt_param_scheduler": {"max_lr": 4e-4, "num_steps": iteration * 256},
             "rerun_state_machine": None, "rng_state": [rng]}

    file = root / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    file.parent.mkdir(parents=True, exist_ok=True)
    with _fake_megatron_modules():
        torch.save(state, file)
    (root / _TRACKER).write_text(str(iteration))
    return root

