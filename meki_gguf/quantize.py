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
import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from .atomic import replace_atomically
from .errors import MekiError
from .runtime import llama_tool, read_header

TABLE = "meki_mem.weight"
COLD = "meki_mem_cold.weight"               # a two-tier table's cold rows (TABLE: the hot ones)
ROW_ORDER = "meki.memory.row_order"         # u32 [V]: token -> row of the tiers (absent: the token id)
SCALE = "blk.{}.meki_mem_scale.weight"      # per layer, [m] f32: the graph multiplies the gathered rows by it
IMPORTANCE = "meki-table-importance.gguf"   # the importance file's name, as llama-quantize records it
FLOAT_TYPES = ("f32", "f16", "bf16")
# every type that the CPU gather (ggml get_rows) reads and llama-quantize writes, from the most bits
# per value to the fewest
TABLE_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0",
               "iq4_xs", "iq4_nl", "mxfp4", "nvfp4", "q3_k", "iq3_s", "iq3_xxs", "q2_k", "iq2_s", "iq2_xs",
               "q2_0", "iq2_xxs", "tq2_0", "iq1_m", "tq1_0", "iq1_s", "q1_0")
# the types whose quantizer has a weighted rounding search (llama.cpp's imatrix path); the iq1/iq2/
# iq3_xxs ones exist only weighted. q8_0, mxfp4, nvfp4, tq1_0, tq2_0, q2_0 and q1_0 ignore weights.
WEIGHTED = ("q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_xs", "iq4_nl", "q3_k", "iq3_s",
            "iq3_xxs", "q2_k", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
NEEDS_WEIGHTS = ("iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
# How a table is quantized: "plain" (llama.cpp's rounding, as for any tensor), "weighted" (its
# rounding search, every column weighted alike), "scaled" (columns divided by their RMS, the scales
# stored beside the table, and the search weighted by the scales squared where the type has one).
# The default of each type is the best one measured (docs/BENCHMARKS.md, "Table quality per type").
METHODS = ("plain", "weighted", "scaled")
# (scaled was lower than plain for every type on the random model, and within the noise of weighted
# on the demo, whose w_mix is still near 1; nvfp4 was worse scaled on both; q8_0 is within 1e-6 of
# f32 either way, and plain it stays what llama.cpp's converter writes)
DEFAULT_METHOD = {t: "scaled" for t in TABLE_TYPES if t not in FLOAT_TYPES} | {"q8_0": "plain", "nvfp4": "plain"}
# llama-quantize's file types (the backbone's mix), as its usage lists them
BACKBONE_TYPES = ("Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                  "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M",
                  "Q3_K", "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S",
                  "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32")


def block_size(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[Q[type_name.upper()]][0]


def check_table_type(name: str, m: int, option: str = "--table-type") -> str:
    """The lower-case table type, if the table of a model with memory width m can have it."""
    t = name.lower()
    if t not in TABLE_TYPES:
        raise MekiError(f"{option} {name}: not a type the table can have "
                        f"(choose from {', '.join(TABLE_TYPES)})")
    if m % block_size(t):
        raise MekiError(f"{option} {t}: its blocks of {block_size(t)} values do not divide the memory "
                        f"width m = {m} (each layer's slice of a row is quantized on its own)")
    return t


def check_backbone_type(name: str) -> str:
    t = name.upper()
    if t not in BACKBONE_TYPES:
        raise MekiError(f"--type {name}: not a llama-quantize type (choose from {', '.join(BACKBONE_TYPES)})")
    return t


def read_table_info(path: Path) -> tuple[str, int]:
    """(the table's type, m) of the MeKi GGUF at path (a two-tier table: its hot tier's type)."""
    kv, tensors = read_header(path, meki=True)
    m = kv.get("meki.embedding_length_per_layer_input")
    if m is None or TABLE not in tensors:
        raise MekiError(f"{path}: MeKi GGUF without its table {TABLE} or meki.embedding_length_per_layer_input")
    return tensors[TABLE].type.name.lower(), int(m)


def table_tiers(path: Path) -> list[tuple[str, int]]:
    """[(type, rows)] of the table's tiers: one, or the hot and the cold one (docs/FORMAT.md)."""
    _, tensors = read_header(path, meki=True)
    return [(tensors[n].type.name.lower(), int(tensors[n].shape[1])) for n in (TABLE, COLD) if n in tensors]


# --table-bits B: what a budget of B bits per value gets, from the measurements (docs/BENCHMARKS.md,
# "Two tiers of rows"): one type from 4.5 bits; below, two tiers, the hot type for the frequent rows
# and the cold one for the rest, with as many hot rows as the budget pays for.
# Measured on the random Qwen-vocabulary model: at 2.99 bits q6_k/iq2_s (16,384 hot rows) has a
# lower KLD than q5_k/iq2_s at 2.88 on every text; at ~2.15 bits q5_k/iq1_m than q6_k/iq1_m.
BUDGETS = ((4.5, "q4_k", None), (2.57, "q6_k", "iq2_s"), (1.76, "q5_k", "iq1_m"))
# Two tiers pay where a few rows carry most tokens: Qwen's 151,680 (90% of English in the first
# 10.8% of ids), not the trained demo's 4,096 (45% in the first 11%: two tiers at 3.0 bits were worse
# than iq3_xxs alone). A smaller vocabulary gets the single-type front instead.
TIERED_VOCAB = 32768
SINGLE_FRONT = ("q4_k", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xxs")


def bits_per_value(type_name: str) -> float:
    blk, size = gguf.GGML_QUANT_SIZES[Q[type_name.upper()]]
    return 8 * size / blk


def budget_tiers(bits: float, V: int, m: int) -> tuple[str, str | None, int | None]:
    """(table type, cold type, hot rows) of the measured recommendation for `bits` bits per value
    (BUDGETS): the hot rows are as many as fit the budget (a table of V rows, memory width m)."""
    def fits(*types) -> tuple:
        if any(m % block_size(t) for t in types if t):
            raise MekiError(f"--table-bits {bits:g}: its recommendation ({'/'.join(t for t in types if t)}) needs the "
                            f"memory width m = {m} to be a multiple of 256: choose --table-type")
        return types
    if V < TIERED_VOCAB and bits >= bits_per_value(SINGLE_FRONT[-1]):
        return fits(next(t for t in SINGLE_FRONT if bits_per_value(t) <= bits), None) + (None,)
    for least, hot, cold in BUDGETS:
        if bits >= least and cold is None:
            return fits(hot, None) + (None,)
        if cold is not None and bits > bits_per_value(cold):
            bh, bc = bits_per_value(hot), bits_per_value(cold)
            k = min(V - 1, int(V * (bits - bc) / (bh - bc)))
            if k >= 1:
                return fits(hot, cold) + (k,)
    raise MekiError(f"--table-bits {bits}: the smallest table measured is {bits_per_value(BUDGETS[-1][2]):.2f} bits "
                    f"per value ({BUDGETS[-1][2]}); give more bits")


def table_spec(src: Path, table_type: str | None = None, table_bits: float | None = None, cold_type: str | None = None,
               hot_rows: int | None = None, row_order_text: Path | None = None) -> dict:
    """quantize()'s table arguments (table_type, cold_type, hot_rows, row_order) from the command
    line's: a type, or a budget in bits per value (budget_tiers); a row order from a text."""
    if (table_type is None) == (table_bits is None):
        raise MekiError("give the table's type (--table-type) or a budget in bits per value (--table-bits)"
                        + (", not both" if table_type is not None else ""))
    if table_bits is not None:
        if cold_type or hot_rows:
            raise MekiError("--table-bits chooses the tiers itself: no --cold-type or --hot-rows with it")
        table_type, cold_type, hot_rows = budget_tiers(table_bits, sum(n for _, n in table_tiers(src)), read_table_info(src)[1])
        print(f"--table-bits {table_bits:g}: " + (table_type if cold_type is None else
              f"{hot_rows:,} hot rows in {table_type}, the others in {cold_type}"), file=sys.stderr)
    if row_order_text and not cold_type:
        raise MekiError("--row-order-text orders the rows of two tiers: give --cold-type and --hot-rows (or --table-bits)")
    return {"table_type": table_type, "cold_type": cold_type, "hot_rows": hot_rows,
            "row_order": row_order_from_text(src, row_order_text) if row_order_text else None}


def text_ids(model: Path, text: Path) -> tuple[np.ndarray, int]:
    """(the token ids of the file `text` by the model's tokenizer, no BOS; the vocabulary's size)."""
    from .runtime import load
    llm = load(model, n_ctx=16, vocab_only=True)
    try:
        data = Path(text).read_bytes()
    except OSError as e:
        raise MekiError(f"{text}: {e.strerror}") from None
    return np.asarray(llm.tokenize(data, add_bos=False, special=False), np.int64), llm.n_vocab()


def row_order_from_text(model: Path, text: Path) -> np.ndarray:
    """A row order measured on a text (docs/FORMAT.md): the model's tokens of `text` by frequency,
    the most frequent first (ties by id), then the tokens the text does not use, by id;
    row_order[token] = row."""
    ids, V = text_ids(model, text)
    if len(ids) == 0:
        raise MekiError(f"--row-order-text {text}: no tokens in it")
    token_of_row = np.lexsort((np.arange(V), -np.bincount(ids, minlength=V)))
    order = np.empty(V, np.int64)
    order[token_of_row] = np.arange(V)
    return order


def methods_for(table_type: str) -> list[str]:
    """The methods that give a table of this type different bytes: plain (unless the type needs
    weights), weighted (if its quantizer has a weighted search), scaled; a float type: plain."""
    if table_type in FLOAT_TYPES:
        return ["plain"]
    return [m for m in METHODS if not (m == "plain" and table_type in NEEDS_WEIGHTS)
            and not (m == "weighted" and table_type not in WEIGHTED)]


def method_of(table_type: str, method: str | None = None) -> str:
    """How a table of this type is quantized: `method`, or (None) the type's measured default."""
    if table_type in FLOAT_TYPES:
        return "plain"
    method = method or DEFAULT_METHOD[table_type]
    if method not in METHODS:
        raise MekiError(f"table method {method!r}: choose from {', '.join(METHODS)}")
    if method == "plain" and table_type in NEEDS_WEIGHTS:
        raise MekiError(f"--table-type {table_type} exists only with a weighted rounding (method weighted or scaled)")
    return method


def quantize(src: str | Path, out: str | Path, table_type: str, backbone_type: str | None = None,
             allow_requantize: bool = False, threads: int | None = None, method: str | None = None,
             cold_type: str | None = None, hot_rows: int | None = None, row_order: np.ndarray | None = None) -> Path:
    """Write `src` to `out` with the table in `table_type` and the backbone in llama-quantize's
    `backbone_type` (None: as it is). method: one of METHODS (None: the type's measured default).
    Two tiers (docs/FORMAT.md): the first `hot_rows` rows of `row_order` (token -> row; None: the
    token ids) in `table_type`, the others in `cold_type`, one method and one set of scales for
    both (scaled unless both types' defaults are plain). The file appears complete or not at all."""
    src, out = Path(src), Path(out)
    cur, m = read_table_info(src)
    table_type = check_table_type(table_type, m)
    tiers = table_tiers(src)
    if cold_type is not None:
        cold_type = check_table_type(cold_type, m, "--cold-type")
        V = tiers[0][1]
        if hot_rows is None or not 0 < hot_rows < tiers[0][1]:
            raise MekiError(f"--hot-rows: a two-tier table needs between 1 and {V - 1} hot rows (not {hot_rows})")
        if row_order is not None and not np.array_equal(np.sort(row_order), np.arange(V)):
            raise MekiError(f"the row order is not a permutation of the table's {V} rows")
        if method is None:
            method = "plain" if method_of(table_type) == method_of(cold_type) == "plain" else "scaled"
        method_of(cold_type, method)                      # (the cold type may need weights)
    elif hot_rows is not None or row_order is not None:
        raise MekiError("--hot-rows and a row order make a two-tier table: give its cold type (--cold-type)")
    if len(tiers) > 1:
        raise MekiError(f"the table of {src} is already in two tiers ({tiers[0][0]}, {tiers[1][0]}): convert "
                        f"again with --table-type f32 and quantize that")
    method = method_of(table_type, method)
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

    def run(args: list[str], cwd: str | None = None) -> None:
        p = subprocess.run([str(llama_tool("llama-quantize")), *(["--allow-requantize"] if allow_requantize else []),
                            *args, str(threads or os.cpu_count() or 1)], cwd=cwd,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        if p.returncode != 0:
            reason = _reason(p.stdout)
            if reason.startswith("requantizing from type"):
                reason += " (the backbone is already quantized: start from an f32/f16/bf16 file, or pass --allow-requantize)"
            raise MekiError(f"llama-quantize failed: {reason}")

    def write(tmp: Path) -> None:          # llama-quantize truncates and writes the locked temp file
        # (a regex each: the first that matches a tensor's name gives its type)
        table = (["--tensor-type", f"{TABLE.removesuffix('.weight')}={table_type}"] if cold_type is None else
                 ["--tensor-type", f"{TABLE.removesuffix('.weight')}\\.weight={table_type}",
                  "--tensor-type", f"{COLD.removesuffix('.weight')}={cold_type}"])
        with tempfile.TemporaryDirectory(prefix=".meki-quantize-", dir=out.parent) as work:
            reader = gguf.GGUFReader(src)
            step, scales = src, file_scales(reader)
            if method == "scaled" and scales is None and cur in FLOAT_TYPES:
                step = Path(work) / "scaled.gguf"
                scales = write_scaled(src, step)
            if cold_type is not None:
                step = write_tiers(step, Path(work) / "tiers.gguf", hot_rows, row_order)
            weights = []
            if method != "plain" and (table_type in WEIGHTED or cold_type in WEIGHTED):
                # named relative to `work` (the tool's cwd): llama-quantize records the name in the file
                write_importance(Path(work) / IMPORTANCE, np.ones(int(_table(reader)[0].shape[0])) if scales is None else scales,
                                 (TABLE,) if cold_type is None else (TABLE, COLD))
                weights = ["--imatrix", IMPORTANCE]
            if weights and ftype != "COPY":
                # an importance file changes llama-quantize's choice of types for the backbone, and
                # it has none for the backbone's tensors: the backbone is quantized first, on its own
                run([str(step), str(Path(work) / "backbone.gguf"), ftype])
                step = Path(work) / "backbone.gguf"
                ftype_table = "COPY"
            else:
                ftype_table = ftype
            run([*weights, *table, str(Path(step).resolve()), str(Path(tmp).resolve()), ftype_table], cwd=work)
        got = [t for t, _ in table_tiers(tmp)]
        want = [table_type] + ([cold_type] if cold_type else [])
        if got != want:                                     # the tool's rules must leave no doubt
            raise MekiError(f"llama-quantize wrote the table as {'/'.join(got)}, not {'/'.join(want)}")
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


# ---- the table's rounding: column scales and importance ------------------------------------------
#
# A block quantizer rounds each block of 32 (or 256) values on one scale, set by the block's
# largest value. The folded row is alpha_l * RMSNorm(u) * w_mix,l, so within a block the columns'
# magnitudes differ by w_mix's factors, and the small columns get the rounding step of the large
# ones. "scaled" stores each column divided by its RMS over the vocabulary, s (per layer and
# column), and the graph multiplies the gathered rows by s again (`blk.N.meki_mem_scale`, an [m]
# multiply per layer). For a quantizer whose error is proportional to the block's largest value,
# s = the column RMS is the best per-column scale: with r_j the columns' RMS and w_j the weights of
# their errors, max_j (r_j/s_j)^2 * sum_j s_j^2 w_j >= sum_j r_j^2 w_j, with equality at s = r.
# It is computed from the table alone, so any f32/f16 table can be scaled, whatever wrote it.
#
# The weighted rounding is llama.cpp's rounding search with an importance vector (what
# llama-imatrix measures for a matmul weight: the mean squared input per column). The table is no
# matmul weight, but its stored column j reaches the branch multiplied by s_j: an error there costs
# s_j^2 times one in a column of scale 1, which is the importance given (all ones when unscaled).
# Weighting columns by |W_out[:, j]|^2 as well did no better (docs/BENCHMARKS.md).

def _table(reader: gguf.GGUFReader) -> tuple[gguf.ReaderTensor, int, int]:
    """(the table, L, m) of an open MeKi GGUF."""
    table = next(t for t in reader.tensors if t.name == TABLE)
    n_layer = int(reader.fields["meki.block_count"].contents())
    return table, n_layer, int(table.shape[0]) // n_layer


def file_scales(reader: gguf.GGUFReader) -> np.ndarray | None:
    """[L*m] f32: the scales a MeKi GGUF's table is stored with, None if it has none."""
    _, n_layer, _ = _table(reader)
    t = {x.name: x for x in reader.tensors}
    if SCALE.format(0) not in t:
        return None
    return np.concatenate([np.asarray(t[SCALE.format(il)].data, np.float32) for il in range(n_layer)])


def column_scales(table: gguf.ReaderTensor, chunk: int = 8192) -> np.ndarray:
    """[L*m] f32: each column's RMS over the vocabulary (1 for an all-zero column)."""
    ss = np.zeros(int(table.shape[0]), np.float64)
    for lo in range(0, int(table.shape[1]), chunk):
        ss += np.square(table.data[lo:lo + chunk], dtype=np.float64).sum(0)
    s = np.sqrt(ss / int(table.shape[1])).astype(np.float32)
    s[~(s > 0)] = 1
    return s


def rewrite(src: Path, dst: Path, replace: dict | None = None, add: dict | None = None, drop: tuple = (),
            add_kv: dict | None = None, arch: str | None = None, key=lambda name: name) -> Path:
    """Copy the GGUF `src` to `dst`: every key, every tensor as it is except those `replace`d (by
    an array or a gguf.LazyChunkedTensor) or dropped, then the `add`ed ones; `add_kv`: keys to add
    ({key: (value, GGUFValueType, sub-type or None)}); `arch`: another architecture, and `key`
    each key's new name (None: dropped)."""
    replace, add = replace or {}, add or {}
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=arch or reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or key(f.name) is None:
            continue
        vt = f.types[0]
        w.add_key_value(key(f.name), f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for key, (value, vt, sub) in (add_kv or {}).items():
        w.add_key_value(key, value, vt, sub_type=sub)
    for t in reader.tensors:
        if t.name in replace:
            w.add_tensor(t.name, replace[t.name])
        elif t.name not in drop:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    for name, data in add.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def write_scaled(src: Path, dst: Path) -> np.ndarray:
    """Copy the MeKi GGUF `src` (an unscaled f32/f16/bf16 table) to `dst` with its table divided by
    its column scales (f32) and the scales added, one [m] tensor per layer; returns the scales."""
    table, n_layer, m = _table(gguf.GGUFReader(src))
    s = column_scales(table)
    V, n = int(table.shape[1]), 8192
    rows = [lambda lo=lo: np.asarray(table.data[lo:lo + n], np.float32) / s for lo in range(0, V, n)]
    rewrite(src, dst, replace={TABLE: gguf.LazyChunkedTensor(rows, shape=(V, n_layer * m), dtype=np.float32)},
            add={SCALE.format(il): s[il * m:(il + 1) * m].copy() for il in range(n_layer)})
    return s


def write_tiers(src: Path, dst: Path, hot_rows: int, row_order: np.ndarray | None = None) -> Path:
    """Copy the MeKi GGUF `src` (a one-tier float table) to `dst` with its table in two tiers:
    TABLE the first `hot_rows` rows of the row order (token -> row; None: the token ids), COLD the
    rest (f32), and the order as ROW_ORDER when given (docs/FORMAT.md)."""
    table, n_layer, m = _table(gguf.GGUFReader(src))
    V, n = int(table.shape[1]), 8192
    token_of_row = np.arange(V) if row_order is None else np.argsort(row_order)

    def tier(lo: int, hi: int) -> gguf.LazyChunkedTensor:
        rows = [lambda a=a: np.asarray(table.data[token_of_row[a:min(a + n, hi)]], np.float32) for a in range(lo, hi, n)]
        return gguf.LazyChunkedTensor(rows, shape=(hi - lo, n_layer * m), dtype=np.float32)
    kv = {} if row_order is None else {ROW_ORDER: ([int(r) for r in row_order], gguf.GGUFValueType.ARRAY,
                                                   gguf.GGUFValueType.UINT32)}
    return rewrite(src, dst, replace={TABLE: tier(0, hot_rows)}, add={COLD: tier(hot_rows, V)}, add_kv=kv)


def write_importance(path: Path, scales: np.ndarray, tables: tuple[str, ...] = (TABLE,)) -> Path:
    """An importance file (llama-imatrix's GGUF form) with an entry per table tensor: scales^2."""
    weights = np.square(scales.astype(np.float64))
    w = gguf.GGUFWriter(path, arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["meki-gguf: the table's column scales squared (meki_gguf/quantize.py)"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 1)
    for name in tables:
        w.add_tensor(name + ".in_sum2", (weights / weights.mean()).astype(np.float32))
        w.add_tensor(name + ".counts", np.ones(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
