"""Checkpoint -> MeKi GGUF, exactly as docs/FORMAT.md specifies (written with gguf-py).

Every tensor is converted only when GGUFWriter writes it, piece by piece, and the folded table
is streamed from `fold.fold_chunks` straight into the file: peak RAM is the checkpoint itself
plus one chunk. The file appears atomically (temp file in the same folder, then os.replace).
"""
from __future__ import annotations

import os
import uuid
from math import prod
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from .errors import MekiError
from .fold import FOLDED, fold_chunks
from .model import MekiForCausalLM
from .tokenizer import find_tokenizer, tokenizer_kv

ARCH = "meki"
TABLE = "meki_mem.weight"
OUT_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
             "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}  # -> general.file_type
TABLE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")      # what gguf.quants can write

# reference (model.py state_dict) name -> GGUF name; per layer below. Folded params have none.
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "meki.gate_proj.weight": "meki_gate.weight", "meki.out_proj.weight": "meki_out.weight",
    "meki.post_norm.weight": "meki_post_norm.weight",
}


def gguf_name(name: str) -> str | None:
    """GGUF name of a reference tensor; None for the branch params folded into the table."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, _, i, rest = name.split(".", 3)                       # model.layers.{i}.{rest}
    if rest.startswith("meki.") and rest[5:].startswith(FOLDED):
        return None
    return f"blk.{i}.{_BLOCK[rest]}"


def parse_type(name: str, allowed: Iterable[str], option: str) -> Q:
    """'q8_0' -> GGMLQuantizationType.Q8_0, if the converter can write it for this option."""
    qtype = Q.__members__.get(name.upper())
    if qtype is None:
        raise MekiError(f"unknown type {name!r} for {option} (choose from {', '.join(allowed)})")
    if name.lower() not in allowed:
        raise MekiError(f"{option} {name.lower()}: the converter writes only {', '.join(allowed)}; "
                        f"write f16 and use `meki-gguf quantize` for {name.lower()}")
    return qtype


def _check_rows(qtype: Q, n: int, what: str, option: str) -> None:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if n % block:
        raise MekiError(f"{option} {qtype.name.lower()}: {what} = {n} is not a multiple of its block size {block}")


class _Deferred:
    """A tensor GGUFWriter writes without ever holding it.

    GGUFWriter keeps every added tensor until write_tensors_to_file(), so handing it converted
    numpy arrays would hold the whole converted model (and the whole table) in RAM at once.
    It only needs .shape/.dtype/.nbytes before writing and .tofile(f) when writing: here the
    shape is in bytes (dtype uint8 + raw_dtype, as for any quantized tensor) and tofile converts
    the source one piece (row block or fold chunk) at a time."""
    dtype = np.dtype(np.uint8)

    def __init__(self, shape: tuple[int, ...], qtype: Q, pieces: Callable[[], Iterable[torch.Tensor]]):
        self.qtype, self.pieces = qtype, pieces
        self.shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        self.nbytes = prod(self.shape)

    def tofile(self, f) -> None:
        for t in self.pieces():
            a = t.numpy() if t.dtype in (torch.float32, torch.float64) else t.float().numpy()
            if self.qtype not in (Q.F32, Q.F16):
                a = a.astype(np.float32, copy=False)         # gguf.quants' block quantizers take f32
            np.ascontiguousarray(gguf.quants.quantize(a, self.qtype)).tofile(f)


ROW_BLOCK = 1 << 24                                          # values converted at once (64 MiB in f32)


def _row_blocks(t: torch.Tensor) -> Callable[[], Iterable[torch.Tensor]]:
    """The tensor as blocks of whole rows (about ROW_BLOCK values each), to convert piece by piece."""
    if t.dim() < 2:
        return lambda: iter([t])
    step = max(1, ROW_BLOCK // t.shape[1])
    return lambda: (t[i:i + step] for i in range(0, len(t), step))


def check_layout(model_tensors, c) -> list[str]:
    """Check names and shapes against the reference model (model.py is the layout); return the
    names in the reference order (the order of the tensors in the file)."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in MekiForCausalLM(c).state_dict().items()}
    missing, extra = sorted(set(want) - set(model_tensors)), sorted(set(model_tensors) - set(want))
    if missing or extra:
        raise MekiError(f"checkpoint does not match its config: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, shape in want.items():
        if tuple(model_tensors[k].shape) != shape:
            raise MekiError(f"checkpoint tensor {k} has shape {tuple(model_tensors[k].shape)}, config says {shape}")
    return list(want)


def source_dir(path: str | Path) -> Path:
    """The folder a checkpoint lives in: the HF folder, or a Megatron file's root (above
    iter_NNNNNNN/mp_rank_00/): where its name comes from and its own tokenizer is looked for."""
    p = Path(path)
    p = p if p.is_dir() else p.parent
    while p.name.startswith(("mp_rank_", "iter_")) and p.parent != p:
        p = p.parent
    return p


def write_gguf(ckpt, out_path: str | Path, outtype: str = "f16", table_type: str = "f16",
               tokenizer: str | Path | None = None, fold_dtype: torch.dtype = torch.float32,
               chunk: int = 4096, progress: bool | None = None) -> Path:
    """Write `ckpt` (checkpoint.Checkpoint) as a MeKi GGUF. tokenizer: a GGUF or HF tokenizer
    folder; None = the checkpoint folder's own HF tokenizer (error if it has none)."""
    c, tensors, out = ckpt.config, ckpt.tensors, Path(out_path)
    otype = parse_type(outtype, OUT_TYPES, "--outtype")
    ttype = parse_type(table_type, TABLE_TYPES, "--table-type")
    _check_rows(ttype, c.d_mem, "m (memory width; each layer's slice is quantized on its own)", "--table-type")
    plan = []                                                # (gguf name, reference name, type)
    for name in check_layout(tensors, c):
        if (gname := gguf_name(name)) is not None:
            t = tensors[name]
            qtype = otype if t.dim() == 2 else Q.F32         # norms and other 1-D tensors: always f32
            _check_rows(qtype, t.shape[-1], f"the row length of {gname}", "--outtype")
            plan.append((gname, name, qtype))
    if tokenizer is None and (tokenizer := find_tokenizer(source_dir(ckpt.path))) is None:
        raise MekiError(f"no tokenizer: {source_dir(ckpt.path)} has no tokenizer.json; pass --tokenizer "
                        f"(a GGUF or a Hugging Face tokenizer folder)")
    tok_kv = tokenizer_kv(tokenizer, c.vocab_size)
    if not out.parent.is_dir():
        raise MekiError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise MekiError(f"output {out} is a folder")

    w = gguf.GGUFWriter(None, ARCH)
    w.add_name(source_dir(ckpt.path).name)
    w.add_file_type(OUT_TYPES[outtype.lower()])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(w, c)
    for k, v in tok_kv.items():
        w.add_key_value(k, v.value, v.type, v.sub_type)

    for gname, name, qtype in plan:
        t = tensors[name]
        w.add_tensor(gname, _Deferred(tuple(t.shape), qtype, _row_blocks(t)), raw_dtype=qtype)
    # token-major: ne0 = L*m (row t = [T_0[t] | ... | T_{L-1}[t]]), ne1 = V. m is a multiple of the
    # block size, so quantizing whole rows quantizes each layer's slice on its own.
    table = lambda: fold_chunks(c, tensors, chunk=chunk, dtype=fold_dtype, progress=progress)  # noqa: E731
    w.add_tensor(TABLE, _Deferred((c.vocab_size, c.n_layer * c.d_mem), ttype, table), raw_dtype=ttype)

    write_atomic(w, out)
    return out


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
    if w.arch == ARCH:
        w.add_embedding_length_per_layer_input(c.d_mem)
        w.add_bool(f"{ARCH}.memory.gate_on_residual", c.gate_on_residual)


def write_atomic(w: gguf.GGUFWriter, out: Path) -> None:
    """Write w's file to `out` atomically: a temp file in the same folder, then os.replace; on any
    error or Ctrl-C the temp file is removed, and a previous `out` is left as it was."""
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
