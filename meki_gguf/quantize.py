"""Re-type a MeKi GGUF: the memory table and the backbone, each with its own type.

All the work is the patched llama-quantize's (patches/llama.cpp/0002-quantize-MeKi-table.patch):
its default rules leave `meki_mem.weight` as it is, and `--tensor-type meki_mem=T` alone changes
it. With no backbone type the backbone is copied as it is (`COPY`, which in the patched tool
still converts the tensors that `--tensor-type` names). The table is re-quantized from the type
it has in the file: quantize from an f32/f16/bf16 table (what `convert --table-type f32` writes);
re-quantizing an already quantized table compounds the rounding and is refused unless asked for.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as Q

from .atomic import replace_atomically
from .errors import MekiError
from .runtime import llama_tool, read_header

TABLE = "meki_mem.weight"
FLOAT_TYPES = ("f32", "f16", "bf16")
# every type that the CPU gather (ggml get_rows) reads and that llama-quantize writes without an
# importance matrix, from the most bits per value to the fewest
TABLE_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0",
               "iq4_xs", "iq4_nl", "mxfp4", "nvfp4", "q3_k", "iq3_s", "q2_k", "q2_0", "tq2_0", "tq1_0", "q1_0")
# a lookup table has no importance matrix (it is no matmul weight): these types need one
NEEDS_IMATRIX = ("iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
# llama-quantize's file types (the backbone's mix), as its usage lists them
BACKBONE_TYPES = ("Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                  "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M",
                  "Q3_K", "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S",
                  "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32")


def block_size(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[Q[type_name.upper()]][0]


def check_table_type(name: str, m: int) -> str:
    """The lower-case table type, if the table of a model with memory width m can have it."""
    t = name.lower()
    if t in NEEDS_IMATRIX:
        raise MekiError(f"--table-type {t} needs an importance matrix, which a lookup table has none of "
                        f"(choose from {', '.join(TABLE_TYPES)})")
    if t not in TABLE_TYPES:
        raise MekiError(f"--table-type {name}: not a type the table can have "
                        f"(choose from {', '.join(TABLE_TYPES)})")
    if m % block_size(t):
        raise MekiError(f"--table-type {t}: its blocks of {block_size(t)} values do not divide the memory "
                        f"width m = {m} (each layer's slice of a row is quantized on its own)")
    return t


def check_backbone_type(name: str) -> str:
    t = name.upper()
    if t not in BACKBONE_TYPES:
        raise MekiError(f"--type {name}: not a llama-quantize type (choose from {', '.join(BACKBONE_TYPES)})")
    return t


def read_table_info(path: Path) -> tuple[str, int]:
    """(the table's type, m) of the MeKi GGUF at path."""
    kv, tensors = read_header(path, meki=True)
    m = kv.get("meki.embedding_length_per_layer_input")
    if m is None or TABLE not in tensors:
        raise MekiError(f"{path}: MeKi GGUF without its table {TABLE} or meki.embedding_length_per_layer_input")
    return tensors[TABLE].type.name.lower(), int(m)


def quantize(src: str | Path, out: str | Path, table_type: str, backbone_type: str | None = None,
             allow_requantize: bool = False, threads: int | None = None) -> Path:
    """Write `src` to `out` with the table in `table_type` and the backbone in llama-quantize's
    `backbone_type` (None: as it is). The file appears complete or not at all."""
    src, out = Path(src), Path(out)
    cur, m = read_table_info(src)
    table_type = check_table_type(table_type, m)
    ftype = check_backbone_type(backbone_type) if backbone_type else "COPY"
    if cur != table_type and cur not in FLOAT_TYPES:
        if not allow_requantize:
            raise MekiError(f"the table of {src} is already {cur}: re-quantizing it to {table_type} compounds "
                            f"the rounding; convert again with --table-type f32 (or f16) and quantize that, "
                            f"or pass --allow-requantize")
        print(f"warning: re-quantizing the {cur} table to {table_type}: quality is lower than from an "
              f"f32/f16 table", file=sys.stderr)
    if not out.parent.is_dir():
        raise MekiError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise MekiError(f"output {out} is a folder")
    if out.exists() and out.samefile(src):
        raise MekiError(f"output {out} is the input")

    cmd = [str(llama_tool("llama-quantize")), "--tensor-type", f"meki_mem={table_type}"]
    if allow_requantize:
        cmd.append("--allow-requantize")

    def write(tmp: Path) -> None:          # llama-quantize truncates and writes the locked temp file
        p = subprocess.run([*cmd, str(src), str(tmp), ftype, str(threads or os.cpu_count() or 1)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        if p.returncode != 0:
            reason = _reason(p.stdout)
            if reason.startswith("requantizing from type"):
                reason += " (the backbone is already quantized: start from an f32/f16/bf16 file, or pass --allow-requantize)"
            raise MekiError(f"llama-quantize failed: {reason}")
        got, _ = read_table_info(tmp)
        if got != table_type:                               # the tool's rules must leave no doubt
            raise MekiError(f"llama-quantize wrote the table as {got}, not {table_type}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    replace_atomically(out, write)
    return out


def _reason(log: str) -> str:
    """The line of llama-quantize's log that says why it failed."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for key in ("failed to quantize: ", "error: ", "invalid "):
        for ln in lines:
            if key in ln:
                return ln.split("failed to quantize: ", 1)[-1]
    return lines[-1] if lines else "no output"
