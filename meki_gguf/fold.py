"""The fold (re-parameterization): MeKi's memory branch -> one lookup table per layer.

    T_l = alpha_l * RMSNorm_mix(M_l + beta_l * G_l(E))        T_l : [V, m]

G_l only ever sees rows of the constant word embedding E, so the expert vector is a function
of the token id alone and can be evaluated for the whole vocabulary once, offline.

The formula and the fold live in llama.cpp's converter, our MeKi model class there
(cpp/conversion/meki.py: `memory_expert`, `fold_rows`), which writes the token-major table when a
GGUF is made by `meki-gguf convert` or by llama.cpp's convert_hf_to_gguf.py. This module re-exports
them for the PyTorch model (model.py) and streams them over a checkpoint (`fold_chunks`).
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch

try:
    from conversion.meki import FOLDED, LEGACY_GATE, fold_rows, memory_expert  # noqa: F401 (re-exported)
except ImportError as e:   # pragma: no cover - the install puts it there (scripts/build_llama.py)
    raise ImportError(f"meki_gguf needs llama.cpp's conversion package from the patched tree "
                      f"(scripts/install.sh installs it): {e}") from None


@torch.no_grad()
def fold_chunks(c, tensors: Mapping[str, torch.Tensor], chunk: int = 4096,
                dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """Stream the token-major table of every layer: yields [n, L*m] row blocks (n <= chunk),
    in token order, row t = [T_0[t] | T_1[t] | ... | T_{L-1}[t]] (docs/FORMAT.md).
    c: a MekiConfig; tensors: the checkpoint's (Hugging Face names, any dtype)."""
    for lo in range(0, c.vocab_size, chunk):
        yield fold_rows(tensors.__getitem__, lo, min(lo + chunk, c.vocab_size), c.n_layer, c.norm_eps,
                        c.folded, c.dyn_norm, dtype)
