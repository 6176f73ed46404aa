"""What every checkpoint reader shares: the `Checkpoint` it returns, its lazy tensor mapping, the
reference layout it is checked against, and the one-line messages built from untrusted values."""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from ..errors import MekiError
from ..model import MekiConfig, MekiForCausalLM


@dataclass
class Checkpoint:
    config: MekiConfig
    tensors: Mapping[str, torch.Tensor]   # reference state_dict names, torch layout [out, in]
    source_format: str                    # "megatron" or "hf"
    path: Path                            # the file (Megatron) or folder (HF) actually read


class LazyTensors(Mapping):
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
            raise MekiError(f"cannot read tensor {name}: {first_line(e)}") from None

    def __contains__(self, name) -> bool:       # without loading the tensor
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __repr__(self) -> str:
        return f"<{len(self)} lazy tensors>"


def reference_shapes(c: MekiConfig, origin: str) -> dict[str, torch.Size]:
    """The reference model's state_dict names and shapes, in its order (a meta model: no memory).
    Callers bound n_layer by the tensors present first: the model has modules per layer."""
    try:
        with torch.device("meta"):
            return {k: v.shape for k, v in MekiForCausalLM(c).state_dict().items()}
    except (RuntimeError, OverflowError, ValueError, TypeError) as e:   # a size, or a product of sizes, past int64
        raise MekiError(f"{origin}: no model has these sizes ({first_line(e)})") from None


# Untrusted values in messages: bounded depth and length, quoted, so one line whatever a file holds
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 100, 100


def brief(v) -> str:
    # reprlib quotes strings (escaping their line breaks) but not other objects' own reprs (a tensor's)
    return " ".join(line.strip() for line in _REPR.repr(v).splitlines())


def first_line(e: BaseException) -> str:
    """A library's error message, for ours: its first line, at most 200 characters, with the
    characters that could break a line escaped (a file's bytes end up in messages)."""
    text = str(e).strip().split("\n")[0][:200]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or type(e).__name__


def typed(v, kind: type, what: str):
    """v as an int, float or bool; MekiError naming `what` otherwise (JSON and pickles hold anything).
    Floats must be finite (JSON and pickles can spell NaN and infinity)."""
    ok = isinstance(v, bool) if kind is bool else (
        isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool))
    if not ok:
        raise MekiError(f"{what}={brief(v)} is not a{'n' if kind is int else ''} {kind.__name__}")
    if kind is float and not math.isfinite(v):
        raise MekiError(f"{what}={brief(v)} is not a finite number")
    return kind(v)


def checked(c: MekiConfig, origin: str) -> MekiConfig:
    """Sizes a model can be built from: positive, heads a multiple of KV heads."""
    for f in fields(c):
        if type(f.default) in (int, float) and getattr(c, f.name) <= 0:
            raise MekiError(f"{origin}: {f.name}={getattr(c, f.name)} must be positive")
    if c.n_head % c.n_kv_head:
        raise MekiError(f"{origin}: {c.n_head} heads are not a multiple of {c.n_kv_head} KV heads")
    return c

