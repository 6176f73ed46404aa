"""Run a MeKi GGUF through the patched llama.cpp: its Python binding and its tools.

`load()` returns a plain `llama_cpp.Llama`, so the whole llama-cpp-python API applies
(completion, chat completion with the file's chat template, streaming, tokenize, ...).
By default the memory table stays on storage: it is mapped, read lazily and its rows are
prefetched by token id (docs/FORMAT.md); `table_resident=True` loads it into RAM instead.

`evict()` and `resident_pages()` are the measurement behind that claim: drop the file from the
page cache, generate, then count which pages of the table the kernel holds (mincore).
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import threading
from math import prod
from pathlib import Path
from typing import NamedTuple

import gguf
from gguf import GGUFValueType as T

from . import native
from .errors import MekiError

LLAMA_BIN = native.bin_dir()          # the patched tools: the wheel's, the checkout's or $MEKI_LLAMA_BIN
TABLE = "meki_mem.weight"
# llama.cpp's refusal of meki-gguf 0.1's misread gate variant (cpp/src/models/meki.cpp), word for word
LEGACY_GATE_KEY = ("meki.memory.gate_on_residual = true: written by meki-gguf 0.1 from a misread Megatron-LM "
                   "layout that no MeKi model has; convert the original checkpoint again")


def load(path: str | Path, *, table_resident: bool = False, n_ctx: int = 2048, **llama_kwargs):
    """Open the MeKi GGUF `path` with llama-cpp-python; llama_kwargs go to `llama_cpp.Llama`.
    MekiError if llama.cpp refuses the file, with llama.cpp's own reason."""
    path = Path(path)
    # a clear error for a missing, non-GGUF or non-MeKi file before llama.cpp's own; the tensor
    # bounds are left to llama.cpp, which checks them itself and names the tensor
    read_header(path, meki=True, bounds=False)
    from llama_cpp import Llama

    llama_kwargs.setdefault("verbose", False)
    with _LOAD_LOCK, _llama_errors() as errors, _lazy_mode(off=table_resident):
        try:
            return Llama(model_path=str(path), n_ctx=n_ctx, **llama_kwargs)
        except ValueError as e:                      # llama-cpp-python's bare "Failed to load model ..."
            reason = _load_reason(errors) or str(e)
    hint = ""
    if "unknown model architecture" in reason:      # a stock llama.cpp: it does not know 'meki'
        hint = "; this llama.cpp lacks the MeKi patch: " + (native.library_note() or (
            "reinstall meki-gguf" if native.installed() else "run scripts/install.sh"))
    raise MekiError(f"{path}: llama.cpp could not load it: {reason}{hint}")


@contextlib.contextmanager
def _lazy_mode(off: bool):
    """The table's read mode for one load: llama.cpp's lazy_mode model parameter (AUTO: the
    architecture's default, lazy for MeKi; OFF: the whole table read into RAM). llama-cpp-python
    0.3.36's Llama() has no argument for it and starts from llama_model_default_params(), so that
    function is wrapped for the one call (under _LOAD_LOCK, so no other load sees it)."""
    if not off:
        yield
        return
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.lazy_mode = C.LLAMA_LAZY_MODE_OFF
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = default


# One load at a time in a process: the error capture swaps llama.cpp's log callback, which is
# process-wide (two loads at once would route each other's lines, or drop them when the first to
# finish restores the callback), and llama-cpp-python's quiet mode (verbose=False) points fds 1
# and 2 at /dev/null during a load and back after, which two overlapping loads would leave at
# /dev/null. Using several loaded models from several threads needs no lock.
_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _llama_errors():
    """Collect the error lines llama.cpp and ggml log while the block runs. llama-cpp-python sends
    them to /dev/null unless verbose and raises only "Failed to load model from file", so the
    reason would be lost; its own log callback still gets every line, and is put back after.
    Process-wide: hold _LOAD_LOCK around it."""
    import llama_cpp
    from llama_cpp import _logger

    errors: list[str] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        last[0] = last[0] if level == _GGML_LOG_CONT else level
        if last[0] == _GGML_LOG_ERROR:
            errors.append(text.decode("utf-8", "replace"))
        _logger.llama_log_callback(level, text, user_data)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield errors
    finally:                                         # before `collect`, a local, is freed
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5    # ggml.h enum ggml_log_level (llama_cpp/_logger.py has an older order)


def _load_reason(errors: list[str]) -> str:
    """The line of llama.cpp's error log that says why a load failed: X of the loader's last
    "<function>: error loading model: X", else the last line other than its closing
    "<function>: failed to load model"."""
    lines = [" ".join(ln.split()) for ln in "".join(errors).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error loading model: " in ln:
            return ln.split("error loading model: ", 1)[1]
    lines = [ln for ln in lines if not ln.endswith("failed to load model")]
    return lines[-1] if lines else ""


def llama_tool(name: str) -> Path:
    """A patched llama.cpp tool (llama-cli, llama-server, ...): the installed wheel's, else the
    checkout's build; $MEKI_LLAMA_BIN overrides the folder."""
    folder = native.bin_dir()
    exe = folder / name
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        fix = "check MEKI_LLAMA_BIN" if os.environ.get("MEKI_LLAMA_BIN") else (
            "reinstall meki-gguf" if native.installed() else "run scripts/install.sh")
        raise MekiError(f"{name} not found in {folder}: {fix}")
    return exe


# --- the GGUF header ---------------------------------------------------------------------------
# gguf-py's GGUFReader parses every array element into numpy (about 8 s for a 152k-token
# vocabulary), so the header is walked here: arrays are skipped (their length is kept), scalars
# and strings kept. Everything that only needs the header (load, inspect, quantize, the benches)
# reads it here; the tokenizer copy, which needs the arrays, uses GGUFReader.

class ArrayLen(int):
    """An array's length, standing in for the array in read_header's metadata."""


class TensorInfo(NamedTuple):
    offset: int                      # absolute file offset of the data
    nbytes: int
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]           # ggml order: ne0 first


_SCALAR = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
           T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}


def read_header(path: str | Path, meki: bool = False, bounds: bool = True) -> tuple[dict, dict[str, TensorInfo]]:
    """(metadata, arrays as their ArrayLen, plus GGUF.version; {tensor: TensorInfo}) of a GGUF file.
    MekiError if it is missing or not a GGUF; with meki=True also if it is not a MeKi GGUF; with
    bounds=True also if it is truncated (a tensor's data runs past the end of the file)."""
    path = Path(path)
    if not path.is_file():
        raise MekiError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != struct.pack("<I", gguf.GGUF_MAGIC):
            raise MekiError(f"{path}: not a GGUF file")

        def unpack(fmt):
            fmt = "<" + fmt
            data = f.read(struct.calcsize(fmt))
            return struct.unpack(fmt, data)

        def value(t: int, keep: bool = True):
            if t == T.STRING:
                (n,) = unpack("Q")
                if n > file_size:
                    raise ValueError("string longer than the file")
                return f.read(n).decode("utf-8", "replace") if keep else f.seek(n, 1)
            if t == T.ARRAY:
                et, n = unpack("IQ")
                if et in _SCALAR:
                    f.seek(n * struct.calcsize(_SCALAR[T(et)]), 1)
                else:
                    for _ in range(n):
                        value(T(et), keep=False)
                return ArrayLen(n)
            return unpack(_SCALAR[T(t)])[0]

        try:
            version, n_tensors, n_kv = unpack("IQQ")
            kv = {"GGUF.version": version}
            for _ in range(n_kv):
                key, t = value(T.STRING), T(unpack("I")[0])
                kv[key] = value(t)
            infos = []
            for _ in range(n_tensors):
                name, (n_dims,) = value(T.STRING), unpack("I")
                ne, (qtype, offset) = unpack("Q" * n_dims), unpack("IQ")
                qtype = gguf.GGMLQuantizationType(qtype)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                infos.append((name, offset, prod(ne) // block * type_size, qtype, ne))
            align = kv.get(gguf.Keys.General.ALIGNMENT) or gguf.GGUF_DEFAULT_ALIGNMENT
            data = -(-f.tell() // align) * align
        except struct.error:                         # the header ends early
            raise MekiError(f"{path}: not a valid GGUF file (truncated header)") from None
        except (ValueError, KeyError, OverflowError) as e:   # a value type, tensor type or size out of range
            raise MekiError(f"{path}: not a valid GGUF file (corrupt header: {e})") from None
    arch = kv.get("general.architecture")
    if meki and arch != "meki":
        raise MekiError(f"{path}: a {arch!r} GGUF, not a MeKi one (general.architecture is not 'meki')")
    tensors = {name: TensorInfo(data + off, n, qtype, ne) for name, off, n, qtype, ne in infos}
    if bounds:                                       # a copy or download cut short
        for name, t in sorted(tensors.items(), key=lambda it: it[1].offset):
            if t.offset + t.nbytes > file_size:
                raise MekiError(f"{path}: truncated: the data of tensor {name!r} ends at byte "
                                f"{t.offset + t.nbytes}, past the end of the file ({file_size} bytes)")
    return kv, tensors


def table_range(path: str | Path) -> tuple[int, int]:
    """(file offset, nbytes) of the memory table meki_mem.weight."""
    _, tensors = read_header(path, meki=True)
    if TABLE not in tensors:
        raise MekiError(f"{path}: MeKi GGUF without the table {TABLE}")
    return tensors[TABLE].offset, tensors[TABLE].nbytes


# --- page-cache residency -----------------------------------------------------------------------

def evict(path: str | Path) -> None:
    """Drop the file's pages from the page cache (pages some process still maps stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)                                 # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype, _libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                            ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(path: str | Path, offset: int, nbytes: int) -> tuple[int, int]:
    """(pages in the page cache, pages in all) of the byte range [offset, offset+nbytes) of a file.
    mincore on a fresh shared mapping of the range reports the page cache, whoever read it."""
    ps = mmap.PAGESIZE
    start, end = offset // ps * ps, offset + nbytes
    length = end - start
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap: {os.strerror(ctypes.get_errno())}", str(path))
        try:
            vec = ctypes.create_string_buffer(-(-length // ps))
            if _libc.mincore(addr, length, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore: {os.strerror(ctypes.get_errno())}", str(path))
        finally:
            _libc.munmap(addr, length)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw), len(vec.raw)
