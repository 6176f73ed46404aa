"""Checkpoint -> MeKi GGUF, exactly as docs/FORMAT.md specifies.

The file is written by llama.cpp's own converter class for MeKi (`conversion.meki.MekiModel`,
cpp/conversion/meki.py), the one convert_hf_to_gguf.py uses: names, keys, fold and table come from
one place whether the checkpoint is a Hugging Face folder or an official Megatron-LM one. This
module feeds it our lazily read checkpoint (checkpoint.py) and tokenizer (tokenizer.py), checks the
types up front (llama.cpp's converter would fall back to f16 with a warning; we stop and say why),
and makes the write atomic (a temp file in the same folder, then os.replace).

Peak RAM: llama.cpp's lazy tensors convert one tensor at a time, and the table is folded and written
one chunk of tokens at a time (gguf.LazyChunkedTensor): never whole.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import gguf
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from conversion.base import LazyTorchTensor
from conversion.meki import MekiModel

from .atomic import replace_atomically
from .errors import MekiError
from .quantize import FLOAT_TYPES, TABLE_TYPES, method_of, quantize, table_spec
from .checkpoint.hf import HF_META
from .fold import FOLDED
from .model import MekiForCausalLM
from .tokenizer import find_tokenizer, tokenizer_kv

ARCH = "meki"
OUT_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
             "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}  # -> general.file_type
# TABLE_TYPES (quantize.py): float tables are written here, and so are those whose method is plain
# and which gguf-py rounds as llama.cpp does (DIRECT); the others as an f32 table that quantize.py
# then rounds with the type's method
DIRECT = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")

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


def write_gguf(ckpt, out_path: str | Path, outtype: str = "f16", table_type: str | None = "f16",
               tokenizer: str | Path | None = None, fold_dtype: torch.dtype = torch.float32,
               chunk: int | None = None, progress: bool | None = None, tiers: dict | None = None) -> Path:
    """Write `ckpt` (checkpoint.Checkpoint) as a MeKi GGUF. tokenizer: a GGUF or HF tokenizer
    folder; None = the checkpoint folder's own HF tokenizer (error if it has none). tiers: a
    two-tier table or a budget (quantize.table_spec's table_bits, cold_type, hot_rows,
    row_order_text), rounded from the f32 table as `meki-gguf quantize` does."""
    c, tensors, out = ckpt.config, ckpt.tensors, Path(out_path)
    otype = parse_type(outtype, OUT_TYPES, "--outtype")
    ttype = parse_type(table_type, TABLE_TYPES, "--table-type") if table_type is not None else Q.F32
    _check_rows(ttype, c.d_mem, "m (memory width; each layer's slice is quantized on its own)", "--table-type")
    for name in check_layout(tensors, c):                   # llama.cpp's converter would fall back to f16
        if (gname := gguf_name(name)) is not None and tensors[name].dim() == 2:
            _check_rows(otype, tensors[name].shape[-1], f"the row length of {gname}", "--outtype")
    if tokenizer is None and (tokenizer := find_tokenizer(source_dir(ckpt.path))) is None:
        raise MekiError(f"no tokenizer: {source_dir(ckpt.path)} has no tokenizer.json; pass --tokenizer "
                        f"(a GGUF or a Hugging Face tokenizer folder)")
    tok_kv = tokenizer_kv(tokenizer, c.vocab_size)
    if not out.parent.is_dir():
        raise MekiError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise MekiError(f"output {out} is a folder")

    def converter(table: Q) -> _Converter:
        return _Converter(ckpt, tok_kv, ftype=OUT_TYPES[outtype.lower()], table_type=table, fold_dtype=fold_dtype,
                          chunk=chunk, progress=progress)
    if tiers is None and (table_type.lower() in FLOAT_TYPES or
                          (method_of(table_type.lower()) == "plain" and table_type.lower() in DIRECT)):
        replace_atomically(out, converter(ttype).write_to)          # gguf-py rounds as llama-quantize's plain path
        return out
    with tempfile.TemporaryDirectory(prefix=".meki-convert-", dir=out.parent) as work:
        f32 = Path(work) / "table-f32.gguf"
        replace_atomically(f32, converter(Q.F32).write_to)
        spec = table_spec(f32, table_type and table_type.lower(), **(tiers or {}))
        if progress is not False:
            print(f"quantizing the table to {spec['table_type']}"
                  f"{'/' + spec['cold_type'] if spec['cold_type'] else ''}", file=sys.stderr)
        quantize(f32, out, **spec)
    return out


class _Converter(MekiModel):
    """llama.cpp's MekiModel fed from a `Checkpoint` and our tokenizer handling."""
    model_arch = MekiModel.model_arch

    def __init__(self, ckpt, tok_kv, ftype, table_type, fold_dtype, chunk, progress):
        self._ckpt, self._tok_kv, self._progress = ckpt, tok_kv, progress
        self.table_type, self.fold_dtype = table_type, fold_dtype
        if chunk is not None:
            self.fold_chunk = chunk
        hparams = {**HF_META, **asdict(ckpt.config)}           # what its config.json holds
        super().__init__(source_dir(ckpt.path), ftype, Path(os.devnull), hparams=hparams)

    def index_tensors(self, remote_hf_model_id=None):
        t = self._ckpt.tensors                                  # read lazily, in the reference order
        return {k: (lambda k=k: LazyTorchTensor.from_eager(t[k])) for k in t}

    def set_vocab(self):                                        # a GGUF's or a HF folder's, fitted to V
        for k, v in self._tok_kv.items():
            self.gguf_writer.add_key_value(k, v.value, v.type, v.sub_type)

    def write_to(self, path: Path) -> None:
        """ModelBase.write, to `path`, with our progress setting and an fsync."""
        self.prepare_tensors()
        self.prepare_metadata(vocab_only=False)
        w = self.gguf_writer
        try:
            w.write_header_to_file(path=path)
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=sys.stderr.isatty() if self._progress is None else self._progress)
            w.flush()
            os.fsync(w.fout[0].fileno())
        finally:
            w.close()
