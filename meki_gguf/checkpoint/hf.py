"""The Hugging Face-style layout: config.json + model.safetensors (or shards + transformers'
index), training or folded form (docs/FORMAT.md). `export_hf` writes it, `load_hf` reads it:
tensors are opened with `safe_open` and read only when asked for."""
from __future__ import annotations

import copy
import json
from dataclasses import fields
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from ..errors import MekiError
from ..fold import LEGACY_GATE
from ..model import MekiConfig, MekiForCausalLM
from .base import Checkpoint, LazyTensors, brief, checked, first_line, reference_shapes, typed


INDEX = "model.safetensors.index.json"
HF_META = {"architectures": ["MekiForCausalLM"], "model_type": "meki"}
_OPTIONAL = {"folded": False, "dyn_norm": False}   # absent: the training form, no input norm in G


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
    config.architectures = HF_META["architectures"]
    config.save_pretrained(out)
    # own storage per tensor: a Megatron checkpoint's are views of fused tensors (QKV, gate|up)
    save_torch_state_dict({k: tensors[k].clone(memory_format=torch.contiguous_format) for k in tensors}, out,
                          max_shard_size=max_shard_size, metadata={"format": "pt"})


def load_hf(folder: Path) -> Checkpoint:
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as e:     # RecursionError: deeply nested JSON
        raise MekiError(f"{folder}/config.json: cannot read it as JSON ({first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("model_type") != "meki":
        got = meta.get("model_type") if isinstance(meta, dict) else type(meta).__name__
        raise MekiError(f"{folder}/config.json: not a MeKi config (model_type={brief(got)}, expected 'meki')")
    if "gate_on_residual" in meta:                 # meki-gguf 0.1's key; false is today's one layer
        if meta.pop("gate_on_residual") is not False:
            raise MekiError(f"{folder}/config.json: {LEGACY_GATE}")
    names = [f.name for f in fields(MekiConfig)]
    unknown = sorted(set(meta) - set(names) - _hf_standard_keys())
    if unknown:                                    # a typo must not fall back to a default
        raise MekiError(f"{folder}/config.json: unknown keys {brief(unknown)}")
    missing = [n for n in names if n not in meta and n not in _OPTIONAL]   # defaults would invent a model
    if missing:
        raise MekiError(f"{folder}/config.json: missing keys {missing}")
    cfg = {**_OPTIONAL, **{n: meta[n] for n in names if n in meta}}
    config = checked(MekiConfig(**{f.name: typed(cfg[f.name], type(f.default), f"{folder}/config.json: {f.name}")
                                    for f in fields(MekiConfig)}), f"{folder}/config.json")

    handles = {}                                   # tensor name -> open safetensors file
    for f in _hf_shards(folder):
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:
            raise MekiError(f"{f}: not a readable safetensors file ({first_line(e)})") from None
        for k in h.keys():
            handles[k] = h
    if config.n_layer > len(handles):              # every layer has tensors; bounds the model built next
        raise MekiError(f"{folder}: config.json has n_layer={config.n_layer} but the safetensors hold "
                        f"only {len(handles)} tensors")
    expected = reference_shapes(config, f"{folder}/config.json")
    extra = [k for k in handles if k not in expected]
    if extra:
        raise MekiError(f"{folder}: unknown tensor {brief(extra[0])} (not in the MeKi layout for this config.json)")
    for k, shape in expected.items():
        if k not in handles:
            raise MekiError(f"{folder}: missing tensor {k}")
        got = handles[k].get_slice(k).get_shape()
        if list(got) != list(shape):
            raise MekiError(f"{folder}: shape mismatch for {k}: expected {list(shape)} "
                            f"(from config.json), got {list(got)}")
    loaders = {k: (lambda k=k: handles[k].get_tensor(k)) for k in expected}
    return Checkpoint(config, LazyTensors(loaders), "hf", folder)


def _hf_shards(folder: Path) -> list[Path]:
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) for f in files):
                raise TypeError("weight_map names a shard by a non-string")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise MekiError(f"{folder}/{INDEX}: malformed index ({type(e).__name__}: {first_line(e)})") from None
        for f in files:
            if not (folder / f).is_file():
                raise MekiError(f"{folder}/{INDEX}: names {brief(f)}, which does not exist")
        return [folder / f for f in files]
    raise MekiError(f"{folder}: has config.json but neither model.safetensors nor {INDEX}")

