"""MeKi (arXiv 2602.03359): a Qwen3-style decoder whose every layer carries a token-indexed memory
beside the FFN. In training form, layer l computes for token x the expert vector

    e = alpha_l * RMSNorm_mix(M_l[x] + beta_l * G_l(E[x]))        G_l: SwiGLU d -> d/2 -> m

which depends on the token id alone (E is the word embedding), so the converter evaluates it for
every token once ("the fold") and writes all layers as one token-major lookup table, `meki_mem`
{L*m, V}: row t = [T_0[t] | T_1[t] | ... | T_{L-1}[t]]. llama.cpp keeps that table in the mapped
file and gathers one row per token (src/models/meki.cpp). Checkpoints that are already folded
(`folded: true`, a `meki.table` [V, m] per layer) are only re-laid out token-major.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch import Tensor

from .base import LazyTorchTensor, ModelBase, TextModel, gguf, logger

# Qwen2/Qwen3's pre-tokenizer, as in their tokenizer.json (llama.cpp pre type "qwen2"). MeKi
# models use Qwen3's tokenizer; one trained anew (a small model's) has other token ids, so its
# hash is unknown, but it splits text exactly as Qwen's does when it has this definition.
QWEN2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split",
         "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ],
}

# Memory-branch parameters that the fold consumes (per layer, under `model.layers.{i}.meki.`);
# the rest of the branch (gate_proj, out_proj, post_norm) is written as it is.
FOLDED = ("memory.", "dyn.", "mix_norm.", "alpha", "beta", "table")
TABLE = "meki_mem.weight"

# meki-gguf 0.1 wrote `gate_on_residual: true` (config.json) and `meki.memory.gate_on_residual`
# (GGUF) for a layer that no MeKi code has, from a misreading of Megatron-LM's Transformer Engine
# spec: weights with that flag would run, silently wrong, so they are refused
LEGACY_GATE = ("gate_on_residual=true: written by meki-gguf 0.1 from a misread Megatron-LM layout that no "
               "MeKi model has; convert the original Megatron-LM checkpoint again")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def memory_expert(memory: Tensor, emb: Tensor, dyn_gate: Tensor, dyn_up: Tensor, dyn_down: Tensor,
                  mix_norm: Tensor, alpha: Tensor, beta: Tensor, eps: float,
                  dyn_norm: Tensor | None = None) -> Tensor:
    """MeKi's expert vector for a batch of tokens: memory = M_l[x] [n, m], emb = E[x] [n, d].

        e = alpha * RMSNorm_mix(M_l[x] + beta * G_l(E[x])),   G_l(u) = W_down (silu(W_gate u) * W_up u)

    dyn_norm: G_l's own input RMSNorm, if it has one (Megatron-LM's Transformer Engine spec fuses
    it into G_l's first linear; the local spec has none). The only implementation of the formula:
    the fold below and meki-gguf's PyTorch/transformers model both evaluate it."""
    u = emb if dyn_norm is None else rms_norm(emb, dyn_norm, eps)
    g = F.linear(F.silu(F.linear(u, dyn_gate)) * F.linear(u, dyn_up), dyn_down)
    return alpha * rms_norm(memory + beta * g, mix_norm, eps)


def fold_rows(get: Callable[[str], Tensor], lo: int, hi: int, n_layer: int, eps: float, folded: bool,
              dyn_norm: bool, dtype: torch.dtype = torch.float32, rows: int = 1024) -> Tensor:
    """Token-major table rows [lo, hi): [hi-lo, L*m] in `dtype`. dyn_norm: G_l has an input norm
    (`dyn.norm.weight`; the checkpoint has that weight).

    get(name) returns a checkpoint tensor by its Hugging Face name; the token-indexed ones are
    sliced to [lo, hi) before they are read, so a chunk touches only its own rows. G_l runs
    `rows` tokens at a time: its [rows, d] temporaries then stay in malloc's reuse range."""
    out = []
    emb = None if folded else get("model.embed_tokens.weight")[lo:hi].to(dtype)
    for il in range(n_layer):
        p = f"model.layers.{il}.meki."
        if folded:
            out.append(get(p + "table")[lo:hi].to(dtype))
            continue
        w = {k: get(p + k).to(dtype) for k in ("dyn.gate_proj.weight", "dyn.up_proj.weight", "dyn.down_proj.weight",
                                               "mix_norm.weight", "alpha", "beta")}
        norm = get(p + "dyn.norm.weight").to(dtype) if dyn_norm else None
        mem = get(p + "memory.weight")[lo:hi].to(dtype)
        t = torch.empty(hi - lo, mem.shape[1], dtype=dtype)
        for a in range(0, hi - lo, rows):
            b = min(a + rows, hi - lo)
            t[a:b] = memory_expert(mem[a:b], emb[a:b], w["dyn.gate_proj.weight"], w["dyn.up_proj.weight"],
                                   w["dyn.down_proj.weight"], w["mix_norm.weight"], w["alpha"], w["beta"],
                                   eps, norm)
        out.append(t)
    return torch.cat(out, dim=1)


@ModelBase.register("MekiForCausalLM")
@ModelBase.example("ningding-o/MeKi")
class MekiModel(TextModel):
    model_arch = gguf.MODEL_ARCH.MEKI

    # --meki-table-type; None: the table follows --outtype like every other matrix
    table_type: gguf.GGMLQuantizationType | None = None
    fold_dtype = torch.float32
    fold_chunk = 4096          # tokens folded (and written) at once: [4096, L*m] floats

    def set_vocab(self):
        # as Qwen2/3: SentencePiece when there is a tokenizer.model, else byte-level BPE
        try:
            self._set_vocab_sentencepiece()
        except FileNotFoundError:
            self._set_vocab_gpt2()

    def get_vocab_base_pre(self, tokenizer) -> str:
        level = logger.level
        logger.setLevel(logging.ERROR)       # the "not recognized" banner is noise when the fallback holds
        try:
            return TextModel.get_vocab_base_pre(self, tokenizer)     # (not super(): meki-gguf calls it on a stand-in)
        except NotImplementedError:
            tok = self.dir_model / "tokenizer.json"
            if tok.is_file() and json.loads(tok.read_text(encoding="utf-8")).get("pre_tokenizer") == QWEN2_PRE_TOKENIZER:
                return "qwen2"
            raise
        finally:
            logger.setLevel(level)

    def set_gguf_parameters(self):
        hp, w = self.hparams, self.gguf_writer
        if hp.get("gate_on_residual"):
            raise ValueError(f"config.json: {LEGACY_GATE}")
        w.add_context_length(hp["max_seq_len"])
        w.add_embedding_length(hp["d_model"])
        w.add_block_count(self.block_count)
        w.add_feed_forward_length(hp["d_ff"])
        w.add_head_count(hp["n_head"])
        w.add_head_count_kv(hp["n_kv_head"])
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
        w.add_layer_norm_rms_eps(hp["norm_eps"])
        w.add_rope_freq_base(hp["rope_theta"])
        w.add_embedding_length_per_layer_input(hp["d_mem"])        # m
        w.add_file_type(self.ftype)

    def get_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield from super().get_tensors()
        # the table comes last, after the backbone: modify_tensors turns this marker into it
        yield TABLE, torch.empty(0)

    def modify_tensors(self, data_torch: Tensor, name: str, bid: int | None) -> Iterable[tuple[str, Tensor]]:
        if name == TABLE:
            return [(TABLE, self._table())]
        if bid is not None and ".meki." in name:
            part = name.split(".meki.", 1)[1]
            if part.startswith(FOLDED):
                return []                    # read by the table's chunks
            key = {"gate_proj.weight": gguf.MODEL_TENSOR.MEKI_GATE, "out_proj.weight": gguf.MODEL_TENSOR.MEKI_OUT,
                   "post_norm.weight": gguf.MODEL_TENSOR.MEKI_POST_NORM}[part]
            return [(self.format_tensor_name(key, bid), data_torch)]
        return super().modify_tensors(data_torch, name, bid)

    def tensor_force_quant(self, name, new_name, bid, n_dims):
        if new_name == TABLE and self.table_type is not None:
            return self.table_type
        return super().tensor_force_quant(name, new_name, bid, n_dims)

    def _table(self) -> Tensor:
        """meki_mem as a tensor written one chunk of tokens at a time (never whole in RAM)."""
        hp = self.hparams
        V, L, m = hp["vocab_size"], self.block_count, hp["d_mem"]
        folded = bool(hp.get("folded", False))
        # G_l's input norm is in the table, not in the file: it is there iff the checkpoint has it
        dyn_norm = "model.layers.0.meki.dyn.norm.weight" in self.model_tensors

        def get(name: str) -> Tensor:
            # a fresh lazy tensor each call (to_eager memoizes); sliced before it is read
            return _Eager(self.model_tensors[name])

        def chunk(lo: int, hi: int) -> Callable[[], np.ndarray]:
            return lambda: fold_rows(get, lo, hi, L, hp["norm_eps"], folded, dyn_norm, self.fold_dtype).float().numpy()

        n = self.fold_chunk
        table = gguf.LazyChunkedTensor([chunk(lo, min(lo + n, V)) for lo in range(0, V, n)],
                                       shape=(V, L * m), dtype=np.float32)
        return table  # type: ignore[return-value]


class _Eager:
    """A checkpoint tensor that is read only when sliced or converted (`[lo:hi]`, `.to(dtype)`)."""

    def __init__(self, gen: Callable[[], Tensor]):
        self._gen = gen

    def __getitem__(self, key) -> Tensor:
        return LazyTorchTensor.to_eager(self._gen()[key])

    def to(self, dtype: torch.dtype) -> Tensor:
        return LazyTorchTensor.to_eager(self._gen()).to(dtype)
