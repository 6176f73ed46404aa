"""Read a MeKi checkpoint: the official Megatron-LM layout or our Hugging Face-style layout.

Both come out as one `Checkpoint`: a `MekiConfig` plus a lazy mapping from the reference
model's `state_dict()` names (model.py; docs/FORMAT.md, "Hugging Face-style checkpoint layout")
to tensors in the checkpoint's own dtype. Nothing is read until a tensor is asked for.

One module per format: `megatron` (the official layout; its pickle is read by `unpickle`, a
restricted unpickler, since the file is untrusted input) and `hf`; `base` is what they share.
`save_hf` / `export_hf` and `save_megatron` write both layouts (tests, demo, export-hf).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import MekiError
from .base import Checkpoint, first_line
from .hf import INDEX, export_hf, load_hf, save_hf
from .megatron import load_megatron, megatron_file, save_megatron

__all__ = ["Checkpoint", "load_checkpoint", "export_hf", "save_hf", "save_megatron"]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Detect the layout of `path` and open it lazily; MekiError on anything we cannot read."""
    p = Path(path)
    try:
        if not p.exists():
            raise MekiError(f"no such file or directory: {p}")
        if p.is_file() and (p.suffix == ".safetensors" or p.name in ("config.json", INDEX)):
            p = p.parent
        if p.is_dir() and (p / "config.json").is_file():
            return load_hf(p)
        if p.is_dir() and any(p.glob("*.safetensors")):
            raise MekiError(f"{p}: safetensors without a config.json (the Hugging Face-style layout needs both)")
        return load_megatron(megatron_file(p))
    except OSError as e:      # pathlib's is_file() & co. raise these: EACCES, ENAMETOOLONG (an index's name), EIO
        raise MekiError(f"cannot read the checkpoint {p}: {first_line(e)}") from None
