"""Synthetic random-weight GGUFs at the paper's shapes, for benchmarks: a MeKi model and its dense
twin (the same backbone without the memory branch and table, written as a stock `qwen3` model).
Written with gguf-py and numpy alone (no torch), so that a machine with other pins (the GPU
check, scripts/check_cuda) writes them too; `add_hparams` and `write_atomic` also serve the other
file written by hand, the trained demo (scripts/train_demo.py).

Speed and memory do not depend on the weights' values, so nothing is quantized: each tensor is
random bytes in its block layout (q8_0, q4_0, q6_K) with a fixed, sane block scale, streamed
straight into the file. A 4 GB model is written in about as long as the disk takes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from .atomic import replace_atomically
from .errors import MekiError
from .runtime import read_header


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    d: int
    m: int           # memory width; 0 = dense
    ff: int
    n_head: int
    n_kv_head: int
    head_dim: int = 128
    vocab: int = 151680

    def dense(self) -> "Shape":
        return replace(self, name=self.name.replace("meki", "dense"), m=0)

    def config(self) -> SimpleNamespace:
        """The hyperparameters under MekiConfig's names (add_hparams), with its defaults for the rest."""
        return SimpleNamespace(vocab_size=self.vocab, n_layer=self.n_layer, d_model=self.d, d_mem=self.m,
                               d_ff=self.ff, n_head=self.n_head, n_kv_head=self.n_kv_head,
                               head_dim=self.head_dim, max_seq_len=40960, rope_theta=500000.0, norm_eps=1e-6)


# the paper's models (docs/METHOD.md); the dense 4B is the quality match of MeKi-1.7B
SHAPES = {
    "meki-0.6b": Shape("meki-0.6b", 28, 1024, 128, 3072, 16, 8),
    "meki-1.7b": Shape("meki-1.7b", 28, 2048, 256, 6144, 16, 8),
    "dense-4b": Shape("dense-4b", 36, 2560, 0, 9728, 32, 8),
}

# byte offset of the fp16 block scale `d` in each block layout (ggml-common.h)
_SCALE_OFFSET = {Q.Q8_0: 0, Q.Q4_0: 0, Q.Q6_K: 208, Q.F16: None, Q.F32: None}
_FTYPE = {Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}


class _Random:
    """A tensor GGUFWriter writes without holding it: random blocks of `qtype`, made and written
    a slab at a time. Block scales are set so that values have about the given std."""
    dtype = np.dtype(np.uint8)

    def __init__(self, shape: tuple[int, ...], qtype: Q, std: float, seed: int):
        self.qtype, self.std, self.seed = qtype, std, seed
        self.logical = shape
        self.shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        self.nbytes = int(np.prod(self.shape))

    def tofile(self, f) -> None:
        rng = np.random.default_rng(self.seed)
        if self.qtype == Q.F32:                                    # norms: around 1
            (1.0 + 0.1 * rng.standard_normal(self.logical)).astype(np.float32).tofile(f)
            return
        if self.qtype == Q.F16:
            (self.std * rng.standard_normal(self.logical)).astype(np.float16).tofile(f)
            return
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        # std of the integer codes: int8 uniform ~74, 4-bit (q-8) ~4.6, 6-bit (q-32) x 8-bit sub-scale ~18*64
        code_std = {Q.Q8_0: 74.0, Q.Q4_0: 4.6, Q.Q6_K: 18.5 * 64}[self.qtype]
        d = np.array([self.std / code_std], dtype=np.float16).view(np.uint8)
        off = _SCALE_OFFSET[self.qtype]
        slab = max(1, (32 << 20) // size)                           # blocks per slab (~32 MiB)
        n = self.nbytes // size
        for i in range(0, n, slab):
            k = min(slab, n - i)
            b = np.frombuffer(rng.bytes(k * size), dtype=np.uint8).reshape(k, size).copy()
            b[:, off:off + 2] = d
            if self.qtype == Q.Q6_K:                                # sub-scales: small positive int8
                b[:, 192:208] = 64
            b.tofile(f)


def add_hparams(w: gguf.GGUFWriter, c) -> None:
    """The model's hyperparameters (a MekiConfig) as llama.cpp keys of w's architecture; the
    MeKi keys too when that architecture is MeKi (a dense twin is written as a stock one)."""
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if w.arch == "meki":
        w.add_embedding_length_per_layer_input(c.d_mem)


def write_atomic(w: gguf.GGUFWriter, out: Path) -> None:
    """Write GGUFWriter w's file to `out` atomically (atomic.replace_atomically)."""
    def write(tmp: Path) -> None:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.flush()
        os.fsync(w.fout[0].fileno())
        w.close()
    try:
        replace_atomically(out, write)
    finally:
        w.close()


def write_model(shape: Shape, out: Path, backbone: str = "q8_0", table: str = "q8_0", seed: int = 0,
                tokenizer_kv: dict | None = None) -> Path:
    """Write a random MeKi (shape.m > 0) or dense qwen3 (shape.m == 0) model, atomically. The tied
    embedding takes q8_0 with a q8_0 backbone and q6_K otherwise, as llama-quantize would."""
    bt, tt = Q[backbone.upper()], Q[table.upper()]
    if bt not in _FTYPE or tt not in _SCALE_OFFSET:
        raise MekiError(f"synthetic models: backbone q8_0/q4_0, table q8_0/q4_0/f16 (not {backbone}/{table})")
    et = Q.Q8_0 if bt == Q.Q8_0 else Q.Q6_K
    arch = "meki" if shape.m else "qwen3"
    s = shape
    w = gguf.GGUFWriter(None, arch)
    w.add_name(f"synthetic {s.name} {backbone}")
    w.add_file_type(_FTYPE[bt])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(w, s.config())
    for k, v in (tokenizer_kv or {}).items():
        w.add_key_value(k, v.value, v.type, v.sub_type)

    seq = iter(range(seed * 100000, seed * 100000 + 100000))

    def add(name: str, shape: tuple[int, ...], qtype: Q, std: float = 0.02):
        w.add_tensor(name, _Random(shape, qtype, std, next(seq)), raw_dtype=qtype)

    hq, hkv = s.n_head * s.head_dim, s.n_kv_head * s.head_dim
    add("token_embd.weight", (s.vocab, s.d), et)
    add("output_norm.weight", (s.d,), Q.F32)
    for i in range(s.n_layer):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (s.d,), Q.F32)
        add(b + "attn_q.weight", (hq, s.d), bt, s.d ** -0.5)
        add(b + "attn_k.weight", (hkv, s.d), bt, s.d ** -0.5)
        add(b + "attn_v.weight", (hkv, s.d), bt, s.d ** -0.5)
        add(b + "attn_q_norm.weight", (s.head_dim,), Q.F32)
        add(b + "attn_k_norm.weight", (s.head_dim,), Q.F32)
        add(b + "attn_output.weight", (s.d, hq), bt, hq ** -0.5)
        add(b + "ffn_norm.weight", (s.d,), Q.F32)
        add(b + "ffn_gate.weight", (s.ff, s.d), bt, s.d ** -0.5)
        add(b + "ffn_up.weight", (s.ff, s.d), bt, s.d ** -0.5)
        add(b + "ffn_down.weight", (s.d, s.ff), bt, s.ff ** -0.5)
        if s.m:
            add(b + "meki_gate.weight", (s.m, s.d), bt, s.d ** -0.5)
            add(b + "meki_out.weight", (s.d, s.m), bt, s.m ** -0.5)
            add(b + "meki_post_norm.weight", (s.d,), Q.F32)
    if s.m:
        add("meki_mem.weight", (s.vocab, s.n_layer * s.m), tt, 1.0)

    write_atomic(w, Path(out))
    return out


def meki_weight_bytes(path: Path) -> dict[str, int]:
    """{'table': bytes of meki_mem, 'branch': bytes of the other meki_* tensors (held in RAM),
    'total': all tensor bytes} of a GGUF."""
    out = {"table": 0, "branch": 0, "total": 0}
    for name, t in read_header(path)[1].items():
        out["total"] += t.nbytes
        if name == "meki_mem.weight":
            out["table"] += t.nbytes
        elif ".meki_" in name:
            out["branch"] += t.nbytes
    return out
