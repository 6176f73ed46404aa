"""Read a MeKi checkpoint: the official Megatron-LM layout or our Hugging Face-style layout.

Both come out as one `Checkpoint`: a `MekiConfig` plus a lazy mapping from the reference
model's `state_dict()` names (model.py; docs/FORMAT.md, "Hugging Face-style checkpoint layout")
to tensors in the checkpoint's own dtype. Nothing is read until a tensor is asked for: Megatron
files are memory-mapped, safetensors are opened with `safe_open`, and splitting a fused Megatron
tensor (grouped QKV, gate|up) yields views of the mapped data.

The Megatron pickle is untrusted input. It is read by a restricted unpickler that builds only
tensors and a few plain containers, turns the known harmless foreign classes (Megatron enums,
numpy RNG state, ...) into inert placeholders, and refuses everything else, so a crafted file
can never import or call anything.

`save_hf` and `save_megatron` write both layouts from a reference model (tests, demo).
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import contextlib
import contextvars
import copy
import enum
import json
import math
import pickle
import random
import re
import reprlib
import sys
import types
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from safetensors import safe_open

from .errors import MekiError
from .model import MekiConfig, MekiForCausalLM


@dataclass
class Checkpoint:
    config: MekiConfig
    tensors: Mapping[str, torch.Tensor]   # reference state_dict names, torch layout [out, in]
    source_format: str                    # "megatron" or "hf"
    path: Path                            # the file (Megatron) or folder (HF) actually read


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Detect the layout of `path` and open it lazily; MekiError on anything we cannot read."""
    p = Path(path)
    try:
        if not p.exists():
            raise MekiError(f"no such file or directory: {p}")
        if p.is_file() and (p.suffix == ".safetensors" or p.name in ("config.json", _INDEX)):
            p = p.parent
        if p.is_dir() and (p / "config.json").is_file():
            return _load_hf(p)
        if p.is_dir() and any(p.glob("*.safetensors")):
            raise MekiError(f"{p}: safetensors without a config.json (the Hugging Face-style layout needs both)")
        return _load_megatron(_megatron_file(p))
    except OSError as e:      # pathlib's is_file() & co. raise these: EACCES, ENAMETOOLONG (an index's name), EIO
        raise MekiError(f"cannot read the checkpoint {p}: {_first_line(e)}") from None


class _LazyTensors(Mapping):
    """name -> tensor, each produced on access by a loader (a mapped view or a safetensors read)."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]):
        self._loaders = loaders

    def __getitem__(self, name: str) -> torch.Tensor:
        load = self._loaders[name]                 # KeyError stays a KeyError (Mapping)
        try:
            return load()
        except MekiError:
            raise
        except Exception as e:                     # the file changed or lies about its data
            raise MekiError(f"cannot read tensor {name}: {_first_line(e)}") from None

    def __contains__(self, name) -> bool:       # without loading the tensor
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __repr__(self) -> str:
        return f"<{len(self)} lazy tensors>"


def _reference_shapes(c: MekiConfig, origin: str) -> dict[str, torch.Size]:
    """The reference model's state_dict names and shapes, in its order (a meta model: no memory).
    Callers bound n_layer by the tensors present first: the model has modules per layer."""
    try:
        with torch.device("meta"):
            return {k: v.shape for k, v in MekiForCausalLM(c).state_dict().items()}
    except (RuntimeError, OverflowError, ValueError, TypeError) as e:   # a size, or a product of sizes, past int64
        raise MekiError(f"{origin}: no model has these sizes ({_first_line(e)})") from None


# Untrusted values in messages: bounded depth and length, quoted, so one line whatever a file holds
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 100, 100


def _brief(v) -> str:
    # reprlib quotes strings (escaping their line breaks) but not other objects' own reprs (a tensor's)
    return " ".join(line.strip() for line in _REPR.repr(v).splitlines())


def _first_line(e: BaseException) -> str:
    """A library's error message, for ours: its first line, at most 200 characters, with the
    characters that could break a line escaped (a file's bytes end up in messages)."""
    text = str(e).strip().split("\n")[0][:200]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or type(e).__name__


def _typed(v, kind: type, what: str):
    """v as an int, float or bool; MekiError naming `what` otherwise (JSON and pickles hold anything).
    Floats must be finite (JSON and pickles can spell NaN and infinity)."""
    ok = isinstance(v, bool) if kind is bool else (
        isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool))
    if not ok:
        raise MekiError(f"{what}={_brief(v)} is not a{'n' if kind is int else ''} {kind.__name__}")
    if kind is float and not math.isfinite(v):
        raise MekiError(f"{what}={_brief(v)} is not a finite number")
    return kind(v)


def _checked(c: MekiConfig, origin: str) -> MekiConfig:
    """Sizes a model can be built from: positive, heads a multiple of KV heads."""
    for f in fields(c):
        if type(f.default) in (int, float) and getattr(c, f.name) <= 0:
            raise MekiError(f"{origin}: {f.name}={getattr(c, f.name)} must be positive")
    if c.n_head % c.n_kv_head:
        raise MekiError(f"{origin}: {c.n_head} heads are not a multiple of {c.n_kv_head} KV heads")
    return c


# ---------------------------------------------------------------------------------------------
# Hugging Face-style layout: config.json + model.safetensors (or shards + index)

_INDEX = "model.safetensors.index.json"
_HF_META = {"architectures": ["MekiForCausalLM"], "model_type": "meki"}
_OPTIONAL = {"folded": False}           # absent: the training form


def _hf_standard_keys() -> set[str]:
    """Keys transformers writes into any config.json (PretrainedConfig's own attributes)."""
    from transformers import PretrainedConfig
    return set(PretrainedConfig().to_dict()) | {"transformers_version", "dtype", "torch_dtype", "_name_or_path"}


def save_hf(model: MekiForCausalLM, out_dir: Path, dtype=torch.float32, max_shard_size: str = "5GB") -> None:
    """The model in the Hugging Face-style layout (what model.save_pretrained writes), in `dtype`."""
    export_hf(model.config, {k: v.detach().to(dtype) for k, v in model.state_dict().items()}, out_dir,
              max_shard_size=max_shard_size)


def export_hf(config: MekiConfig, tensors: Mapping[str, torch.Tensor], out_dir: Path,
              max_shard_size: str = "5GB") -> None:
    """config.json + safetensors (sharded above max_shard_size, with transformers' index) from a
    config and its tensors by reference name: a folder transformers and llama.cpp's converter load."""
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.architectures = _HF_META["architectures"]
    config.save_pretrained(out)
    # own storage per tensor: a Megatron checkpoint's are views of fused tensors (QKV, gate|up)
    save_torch_state_dict({k: tensors[k].clone(memory_format=torch.contiguous_format) for k in tensors}, out,
                          max_shard_size=max_shard_size, metadata={"format": "pt"})


def _load_hf(folder: Path) -> Checkpoint:
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as e:     # RecursionError: deeply nested JSON
        raise MekiError(f"{folder}/config.json: cannot read it as JSON ({_first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("model_type") != "meki":
        got = meta.get("model_type") if isinstance(meta, dict) else type(meta).__name__
        raise MekiError(f"{folder}/config.json: not a MeKi config (model_type={_brief(got)}, expected 'meki')")
    names = [f.name for f in fields(MekiConfig)]
    unknown = sorted(set(meta) - set(names) - _hf_standard_keys())
    if unknown:                                    # a typo must not fall back to a default
        raise MekiError(f"{folder}/config.json: unknown keys {_brief(unknown)}")
    missing = [n for n in names if n not in meta and n not in _OPTIONAL]   # defaults would invent a model
    if missing:
        raise MekiError(f"{folder}/config.json: missing keys {missing}")
    cfg = {**_OPTIONAL, **{n: meta[n] for n in names if n in meta}}
    config = _checked(MekiConfig(**{f.name: _typed(cfg[f.name], type(f.default), f"{folder}/config.json: {f.name}")
                                    for f in fields(MekiConfig)}), f"{folder}/config.json")

    handles = {}                                   # tensor name -> open safetensors file
    for f in _hf_shards(folder):
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:
            raise MekiError(f"{f}: not a readable safetensors file ({_first_line(e)})") from None
        for k in h.keys():
            handles[k] = h
    if config.n_layer > len(handles):              # every layer has tensors; bounds the model built next
        raise MekiError(f"{folder}: config.json has n_layer={config.n_layer} but the safetensors hold "
                        f"only {len(handles)} tensors")
    expected = _reference_shapes(config, f"{folder}/config.json")
    extra = [k for k in handles if k not in expected]
    if extra:
        raise MekiError(f"{folder}: unknown tensor {_brief(extra[0])} (not in the MeKi layout for this config.json)")
    for k, shape in expected.items():
        if k not in handles:
            raise MekiError(f"{folder}: missing tensor {k}")
        got = handles[k].get_slice(k).get_shape()
        if list(got) != list(shape):
            raise MekiError(f"{folder}: shape mismatch for {k}: expected {list(shape)} "
                            f"(from config.json), got {list(got)}")
    loaders = {k: (lambda k=k: handles[k].get_tensor(k)) for k in expected}
    return Checkpoint(config, _LazyTensors(loaders), "hf", folder)


def _hf_shards(folder: Path) -> list[Path]:
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / _INDEX).is_file():
        try:
            weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) for f in files):
                raise TypeError("weight_map names a shard by a non-string")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise MekiError(f"{folder}/{_INDEX}: malformed index ({type(e).__name__}: {_first_line(e)})") from None
        for f in files:
            if not (folder / f).is_file():
                raise MekiError(f"{folder}/{_INDEX}: names {_brief(f)}, which does not exist")
        return [folder / f for f in files]
    raise MekiError(f"{folder}: has config.json but neither model.safetensors nor {_INDEX}")


# ---------------------------------------------------------------------------------------------
# Restricted unpickler for Megatron's model_optim_rng.pt

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
        return f"<{self.ref}{_brief(self.args)}>"


class _Refused(MekiError):
    pass


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):      # any other codec name would import a module
        raise _Refused(f"the pickle calls _codecs.encode with encoding {_brief(encoding)}")
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
        raise _Refused(f"the pickle declares a tensor of size {_brief(size)}, stride {_brief(stride)}, "
                       f"offset {_brief(offset)}")
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
                raise _Refused(f"the pickle sets the attribute {_brief(k)} of a Parameter")
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
            raise _Refused(f"the pickle references {_brief(ref)}")
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
                raise _Refused(f"the pickle declares a storage of {_brief(numel)} elements, "
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
        raise MekiError(f"not a checkpoint: {file} is not a readable zip file ({_first_line(e)})") from None
    if any(m.filename.rsplit("/", 1)[-1] == "constants.pkl" for m in members):
        raise _Refused("it is a TorchScript archive (torch.jit.load would run its code)")
    size, names = file.stat().st_size, set()
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size > size:
            raise _Refused(f"its member {_brief(m.filename)} is compressed (torch.save stores records "
                           f"uncompressed) or larger than the file")
        if m.filename in names:
            raise _Refused(f"it has two members named {_brief(m.filename)}")
        names.add(m.filename)


def _torch_load(file: Path):
    # mmap needs torch's zip format (the default since 1.6); legacy files are read whole
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
        mmap = zipfile.is_zipfile(file) or magic == b"PK\x03\x04"   # ours, or torch's test
        size = file.stat().st_size
    except OSError as e:
        raise MekiError(f"cannot read {file}: {_first_line(e)}") from None
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
                        f"({type(e).__name__}: {_first_line(e)})") from None
    finally:
        _storage_limit.reset(token)


# ---------------------------------------------------------------------------------------------
# Megatron-LM layout (--ckpt-format torch, TP=1, PP=1)

_TRACKER = "latest_checkpointed_iteration.txt"
_MP_RANK = re.compile(r"mp_rank_\d+(_\d+)*$")


def _megatron_file(p: Path) -> Path:
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


# Megatron's name for each reference tensor of layer i, per implementation. With Transformer
# Engine the pre-attention and pre-MLP norms are fused into the next linear (`layer_norm_weight`),
# and MeKi's dynamic projection, built from the MLP spec, gets a fused input norm too.
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
        ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight",
         ("post_attention_layernorm.weight",), None),
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
    (QK-norm, the dynamic projection's norm, an untied output). TE's layout iff gate_on_residual."""
    out = _GLOBAL_MAP[:1]                         # Megatron's order: embedding, layers, final norm, output
    for i in range(c.n_layer):
        for mg, ours, pack in _layer_map(c.gate_on_residual):
            out.append((f"decoder.layers.{i}.{mg}", tuple(f"model.layers.{i}.{n}" for n in ours), pack))
    out += _GLOBAL_MAP[1:]
    return [e for e in out if all(n in have for n in e[1])]


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


def _load_megatron(file: Path) -> Checkpoint:
    ck = _torch_load(file)
    if not isinstance(ck, dict) or not isinstance(ck.get("args"), argparse.Namespace):
        raise MekiError(f"not a checkpoint: {file} has no Megatron 'args' (a {type(ck).__name__}"
                        f"{' with keys ' + _brief(list(ck)[:6]) if isinstance(ck, dict) else ''})")
    args = ck["args"]
    if "model" not in ck:
        if "model0" in ck:
            raise MekiError(f"unsupported: {file} is a virtual-pipeline checkpoint (model0, model1, ...)")
        raise MekiError(f"not a checkpoint: {file} has no 'model' state dict")
    if not isinstance(ck["model"], dict):
        raise MekiError(f"not a checkpoint: {file}: 'model' is a {type(ck['model']).__name__}, not a state dict")
    for k in ck["model"]:
        if not isinstance(k, str):
            raise MekiError(f"not a checkpoint: {file}: the state dict has a key {_brief(k)}, not a name")
    sd = {k: v for k, v in ck["model"].items() if not k.endswith("_extra_state")}   # TE bookkeeping
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise MekiError(f"{file}: {_brief(k)} is not a tensor (a {type(v).__name__})")

    config = _megatron_config(args, sd, file)
    summary = _args_summary(config)
    meta = _reference_shapes(config, f"{file}: the args")
    entries = _megatron_map(config, meta)
    expected = {mg: _pack(p, [torch.empty(meta[n], device="meta") for n in ours], config).shape
                for mg, ours, p in entries}          # meta shapes: _reference_shapes built them
    for mg, shape in expected.items():
        if mg not in sd:
            raise MekiError(f"{file}: missing tensor {mg}")
        if list(sd[mg].shape) != list(shape):
            raise MekiError(f"{file}: shape mismatch for {mg}: expected {list(shape)} from the args "
                            f"({summary}), got {list(sd[mg].shape)}")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise MekiError(f"{file}: unexpected tensor {_brief(extra[0])} (not in the MeKi layout implied by "
                        f"the args: {summary})")

    loaders = {}
    for mg, ours, p in entries:
        for j, n in enumerate(ours):
            loaders[n] = lambda mg=mg, p=p, j=j: _unpack(p, sd[mg], config)[j]
    loaders = {n: loaders[n] for n in meta}       # the reference order
    return Checkpoint(config, _LazyTensors(loaders), "megatron", file)


def _megatron_config(args: argparse.Namespace, sd: dict, file: Path) -> MekiConfig:
    def arg(name, kind=None, default=_MISSING):
        v = getattr(args, name, None)              # Megatron leaves unset options at None
        if v is None:
            if default is _MISSING:
                raise MekiError(f"{file}: the checkpoint's args lack {name}")
            return default
        return _typed(v, kind, f"{file}: args.{name}") if kind else v

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if arg(name, int, 1) > 1:
            raise MekiError(f"unsupported: {file} was saved with {name}={arg(name)}; "
                            f"only TP=1, PP=1 checkpoints are supported")
    for name, want in _REQUIRED_ARGS:
        v = arg(name, None, want)
        # compared as plain values: `!=` on a tensor (or anything a pickle holds) is no bool
        if not (type(v) is type(want) or type(v) is int and type(want) is float) or v != want:
            raise MekiError(f"unsupported: {file} has args.{name}={_brief(v)}; MeKi GGUF needs {want!r}")

    # Transformer Engine fuses the norms into the linears: that is also the gate variant
    # (the MeKi module then sees the un-normalized residual, see docs/METHOD.md).
    te_keys = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in sd
    impl = arg("transformer_impl", None, "transformer_engine" if te_keys else "local")
    if not isinstance(impl, str) or impl not in ("transformer_engine", "local"):
        raise MekiError(f"unsupported: {file} has args.transformer_impl={_brief(impl)}")
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
    c = _checked(MekiConfig(
        vocab_size=vocab, n_layer=arg("num_layers", int), d_model=d, d_mem=d_mem,
        d_ff=arg("ffn_hidden_size", int), n_head=heads,
        n_kv_head=arg("num_query_groups", int) if arg("group_query_attention", bool, False) else heads,
        head_dim=arg("kv_channels", int, d // max(heads, 1)),
        rope_theta=arg("rotary_base", float, 10000.0), norm_eps=arg("norm_epsilon", float),
        qk_norm=arg("qk_layernorm", bool, False),
        tied=not arg("untie_embeddings_and_output_weights", bool, False),
        gate_on_residual=te,
        max_seq_len=arg("max_position_embeddings", int, None) or arg("seq_length", int, MekiConfig.max_seq_len),
    ), f"{file}: the args")

    padded = arg("padded_vocab_size", int, vocab)
    if padded != vocab:
        raise MekiError(f"{file}: args.padded_vocab_size={padded} but {emb_key} has {vocab} rows")
    # ASCII digits, few of them: int() refuses 4300+ digits (other keys are then "unexpected")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.layers\.([0-9]{1,9})\.", k))})
    if layers != list(range(c.n_layer)):
        span = f" (decoder.layers.{layers[0]}-{layers[-1]})" if layers else ""
        raise MekiError(f"{file}: args.num_layers={c.n_layer} but the checkpoint holds {len(layers)} layers{span}")
    return c


def _args_summary(c: MekiConfig) -> str:
    return (f"num_layers={c.n_layer} hidden_size={c.d_model} ffn_hidden_size={c.d_ff} "
            f"num_attention_heads={c.n_head} num_query_groups={c.n_kv_head} kv_channels={c.head_dim} "
            f"meki_dim={c.d_mem} vocab={c.vocab_size} qk_layernorm={c.qk_norm} "
            f"untie_embeddings_and_output_weights={not c.tied} "
            f"transformer_impl={'transformer_engine' if c.gate_on_residual else 'local'}")


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
                  dtype=torch.bfloat16, **arg_overrides) -> Path:
    """Write `root/iter_NNNNNNN/mp_rank_00/model_optim_rng.pt` + the tracker file, as the released
    training code (torch format, TP=PP=1) writes them: args Namespace with a Megatron enum, the
    state dict with TE `_extra_state` entries, numpy/torch RNG state. The layout is Transformer
    Engine's iff model.config.gate_on_residual; `arg_overrides` replace args (to craft bad files)."""
    c, root = model.config, Path(root)
    te = c.gate_on_residual
    ours = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    sd = collections.OrderedDict()
    for mg, names, p in _megatron_map(c, ours):
        sd[mg] = _pack(p, [ours[n] for n in names], c).clone()   # own storage per tensor
    extra_state = ["meki_module.gate_proj", "meki_module.out_proj"]     # TE linears in both impls
    if te:
        extra_state += ["self_attention.linear_qkv", "self_attention.core_attention",
                        "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
                        "meki_module.word_emb_projection.linear_fc1",
                        "meki_module.word_emb_projection.linear_fc2"]
    for i in range(c.n_layer):
        for m in extra_state:
            sd[f"decoder.layers.{i}.{m}._extra_state"] = torch.empty(0, dtype=torch.uint8)  # TE 2.x, no fp8

    args = argparse.Namespace(
        num_layers=c.n_layer, hidden_size=c.d_model, ffn_hidden_size=c.d_ff,
        num_attention_heads=c.n_head, group_query_attention=c.n_kv_head != c.n_head,
        num_query_groups=c.n_kv_head, kv_channels=c.head_dim,
        max_position_embeddings=c.max_seq_len, seq_length=c.max_seq_len,
        position_embedding_type="rope", rotary_base=_theta_arg(c.rope_theta), rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=False, normalization="RMSNorm",
        norm_epsilon=c.norm_eps, apply_layernorm_1p=False, swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=c.qk_norm, untie_embeddings_and_output_weights=not c.tied,
        transformer_impl="transformer_engine" if te else "local", use_mcore_models=True,
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
