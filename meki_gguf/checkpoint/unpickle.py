"""A restricted unpickler for Megatron-LM's `model_optim_rng.pt`, which is untrusted input.

It builds only tensors and a few plain containers, turns the known harmless foreign classes
(Megatron enums, numpy RNG state, Transformer Engine's `_extra_state`, ...) into inert
placeholders, and refuses everything else, so a crafted file can never import or call anything;
it bounds what a file can make it allocate (storages, tensor views, nesting). Written here because
torch's own `weights_only` loader refuses what real checkpoints hold (an argparse Namespace with
a Megatron enum, numpy RNG state) and has no hook to make those inert.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import contextvars
import math
import pickle
import types
import zipfile
from pathlib import Path

import torch

from ..errors import MekiError
from .base import brief, first_line


class Opaque:
    """Inert stand-in for a class or function the unpickler will not import (a Megatron enum,
    numpy's array reconstructor, ...). Calling it only records the arguments."""

    ref = "?"                                     # "module.name" it stands for
    args: tuple = ()
    state = None

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self.ref}{brief(self.args)}>"


class _Refused(MekiError):
    pass


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):      # any other codec name would import a module
        raise _Refused(f"the pickle calls _codecs.encode with encoding {brief(encoding)}")
    return text.encode("latin1")


def _tensor_fits(storage, offset, size, stride) -> None:
    """Refuse a tensor that reaches past its storage or has more elements than it (stride 0):
    torch would grow a resizable storage (the legacy format's) to fit, and a stride-0 view of a
    few bytes is a many-GiB tensor to whoever copies it. A tensor read from a file is at most
    as large as the file then."""
    n = storage._size()                           # elements of the storage's dtype (a TypedStorage)
    if not (type(offset) is int and offset >= 0 and isinstance(size, (tuple, list))
            and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and all(type(x) is int and x >= 0 for x in (*size, *stride))):
        raise _Refused(f"the pickle declares a tensor of size {brief(size)}, stride {brief(stride)}, "
                       f"offset {brief(offset)}")
    numel = math.prod(size)
    if numel and (numel > n or offset + sum((s - 1) * st for s, st in zip(size, stride)) >= n):
        raise _Refused(f"the pickle declares a tensor of size {list(size)} (stride {list(stride)}, "
                       f"offset {offset}) on a storage of {n} elements")


def _rebuild_tensor(storage, storage_offset, size, stride):
    _tensor_fits(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *rest):
    _tensor_fits(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, *rest)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    """A Parameter with attributes (Megatron's tensor_model_parallel, ...): none may shadow a
    Tensor attribute (a `reshape` set to a placeholder would break the tensor's readers)."""
    for d in (state if isinstance(state, tuple) else (state,)):
        for k in (d or {}):
            if not isinstance(k, str) or k.startswith("__") or hasattr(torch.Tensor, k):
                raise _Refused(f"the pickle sets the attribute {brief(k)} of a Parameter")
    return torch._utils._rebuild_parameter_with_state(data, requires_grad, backward_hooks, state)


# Real objects the unpickler may return: what torch.save needs for tensors, plus plain containers.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _latin1,              # protocol 2 spells bytes as encode(str, "latin1")
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
# Foreign classes a real checkpoint holds in `args`, `rng_state` and TE's `_extra_state`:
# harmless data, so they become placeholders. Anything else is refused (fail closed).
_OPAQUE_PACKAGES = {"megatron", "numpy", "transformer_engine", "apex"}
_OPAQUE_EXACT = {"_io.BytesIO"}                   # Transformer Engine 1.x `_extra_state`
_opaque_classes: dict[str, type] = {}
_DTYPES = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}   # no getattr: torch imports lazily
# hash() of nested tuples recurses in C without a depth check: a pickle of a few MB that nests
# tuples millions deep and hashes one (a dict key, a set member) crashes the process (SIGSEGV).
# Real checkpoints nest tuples a few deep (RNG state).
_MAX_TUPLE_DEPTH = 100
_storage_limit: contextvars.ContextVar[int | None] = contextvars.ContextVar("_storage_limit", default=None)


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler (pickle._Unpickler): unlike the C one, its opcodes can be
    checked (`dispatch`). Checkpoint pickles are small (the tensors' data is elsewhere)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._depths: dict[int, tuple[tuple, int]] = {}   # id -> (tuple, nesting): tuples are immutable

    def find_class(self, module: str, name: str):
        # protocol 2 (torch.save's) spells Python 3 names the Python 2 way: __builtin__.set
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]                   # args.params_dtype = torch.bfloat16
        ref = f"{module}.{name}"
        if not all(part.isidentifier() for part in ref.split(".")):   # STACK_GLOBAL takes any string
            raise _Refused(f"the pickle references {brief(ref)}")
        if module.split(".")[0] in _OPAQUE_PACKAGES or ref in _OPAQUE_EXACT:
            if ref not in _opaque_classes:
                _opaque_classes[ref] = type(name, (Opaque,), {"ref": ref})
            return _opaque_classes[ref]
        raise _Refused(f"the pickle references {ref}")

    def _tuple_made(self):
        """After an opcode that pushed a tuple: refuse it if it nests tuples too deep."""
        depths, t = self._depths, self.stack[-1]
        depth = 1 + max((depths.get(id(x), (None, 1))[1] for x in t if isinstance(x, tuple)), default=0)
        if depth > _MAX_TUPLE_DEPTH:
            raise _Refused(f"the pickle nests tuples more than {_MAX_TUPLE_DEPTH} deep")
        depths[id(t)] = (t, depth)

    def _persid(self):
        """Refuse a storage larger than the file before torch allocates it (the legacy format
        allocates the declared size, then reads it)."""
        pid, limit = self.stack[-1], _storage_limit.get()
        if isinstance(pid, tuple) and len(pid) >= 5 and limit is not None:
            numel, dtype = pid[4], getattr(pid[1], "dtype", torch.uint8)
            itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 1
            if type(numel) is not int or not 0 <= numel * itemsize <= limit:
                raise _Refused(f"the pickle declares a storage of {brief(numel)} elements, "
                               f"more than the file's {limit} bytes hold")
        pickle._Unpickler.load_binpersid(self)

    def _build(self):
        # Tensor.__setstate__ calls set_() with any size: it grows a resizable storage to fit;
        # a storage's attributes are what _tensor_fits trusts. torch.save sets the state of
        # neither (a tensor's travels in the _rebuild_* arguments).
        if len(self.stack) >= 2 and isinstance(self.stack[-2], (torch.Tensor, torch.storage.TypedStorage,
                                                                 torch.UntypedStorage)):
            raise _Refused(f"the pickle sets the state of a {type(self.stack[-2]).__name__}")
        pickle._Unpickler.load_build(self)


def _depth_checked(load_tuple):
    def load(self):
        load_tuple(self)
        self._tuple_made()
    return load


for _op in (pickle.EMPTY_TUPLE, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3):
    _Unpickler.dispatch[_op[0]] = _depth_checked(_Unpickler.dispatch[_op[0]])
_Unpickler.dispatch[pickle.BINPERSID[0]] = _Unpickler._persid
_Unpickler.dispatch[pickle.BUILD[0]] = _Unpickler._build


# torch.load takes a pickle *module*: it subclasses `.Unpickler` (keeping our find_class).
_safe_pickle = types.ModuleType("meki_safe_pickle")
_safe_pickle.Unpickler = _Unpickler
_safe_pickle.load = lambda f, **kw: _Unpickler(f, **kw).load()


def _check_zip(file: Path) -> None:
    """torch's zip reader inflates a compressed record to the size its entry declares (a zip
    bomb), and hands an archive with constants.pkl to torch.jit.load, past our unpickler.
    torch.save stores its records uncompressed and writes no constants.pkl: refuse the rest.
    Two members of one name would let torch read another record than the one checked here."""
    try:
        with zipfile.ZipFile(file) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise MekiError(f"not a checkpoint: {file} is not a readable zip file ({first_line(e)})") from None
    if any(m.filename.rsplit("/", 1)[-1] == "constants.pkl" for m in members):
        raise _Refused("it is a TorchScript archive (torch.jit.load would run its code)")
    size, names = file.stat().st_size, set()
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size > size:
            raise _Refused(f"its member {brief(m.filename)} is compressed (torch.save stores records "
                           f"uncompressed) or larger than the file")
        if m.filename in names:
            raise _Refused(f"it has two members named {brief(m.filename)}")
        names.add(m.filename)


def torch_load(file: Path):
    """torch.load through the restricted unpickler, for a file that is untrusted input."""
    # mmap needs torch's zip format (the default since 1.6); legacy files are read whole
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
        mmap = zipfile.is_zipfile(file) or magic == b"PK\x03\x04"   # ours, or torch's test
        size = file.stat().st_size
    except OSError as e:
        raise MekiError(f"cannot read {file}: {first_line(e)}") from None
    except zipfile.BadZipFile as e:      # is_zipfile raises it for a ZIP64 locator of a multi-disk zip
        raise MekiError(f"not a checkpoint: {file} is not a readable zip file ({first_line(e)})") from None
    token = _storage_limit.set(size)                 # no storage is larger than the file
    try:
        if mmap:
            _check_zip(file)
        return torch.load(file, map_location="cpu", pickle_module=_safe_pickle,
                          weights_only=False, mmap=mmap)
    except _Refused as e:
        raise MekiError(f"refusing to load {file}: {e}, which is not checkpoint data "
                        f"(a crafted file could run code or exhaust memory this way)") from None
    except MekiError:
        raise
    except Exception as e:
        raise MekiError(f"not a checkpoint: {file} is not a readable PyTorch/Megatron file "
                        f"({type(e).__name__}: {first_line(e)})") from None
    finally:
        _storage_limit.reset(token)

