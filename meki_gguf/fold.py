"""The fold (re-parameterization): MeKi's memory branch -> one lookup table per layer.

    T_l = alpha_l * RMSNorm_mix(M_l + beta_l * G_l(E))        T_l : [V, m]

G_l only ever sees rows of the constant word embedding E, so the expert vector is a function
of the token id alone and can be evaluated for the whole vocabulary once, offline.

The formula lives in one place, `MemoryBranch.expert` (model.py). This module only feeds it
chunks of rows in the fold dtype: a `MemoryBranch` on the meta device (no memory), sized to the
chunk and built once, is assigned each layer's tensors for the chunk (cast to the fold dtype) and
evaluated ROWS rows at a time. Nothing of the model or of the table is ever copied as a whole.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator, Mapping

import torch
from tqdm import tqdm

from .model import MekiConfig, MemoryBranch

# MemoryBranch parameters the fold consumes (they disappear from the inference form);
# the rest (gate_proj, out_proj, post_norm) is written to the GGUF as is.
FOLDED = ("memory.", "dyn.", "mix_norm.", "alpha", "beta")

# Rows of a chunk evaluated at once. G's temporaries are [ROWS, d]: at 1024 rows (4 MiB in f32
# for d = 1024) malloc reuses them; at 4096 rows (16 MiB) each was a fresh mmap whose pages
# faulted in on first touch, which made G's elementwise ops (norm, SwiGLU product, E[ids]
# gather) ~1.7x slower and the whole fold ~15% slower on one thread (torch.profiler; numbers
# in docs/BENCHMARKS.md, "Conversion", measured by scripts/bench_convert.py).
ROWS = 1024


def _sized_branch(c: MekiConfig, n: int, cache: dict[int, MemoryBranch]) -> MemoryBranch:
    """A MemoryBranch sized to n rows (vocab_size = n) on the meta device, built once per size
    and reused: building one runs every submodule's init, which costs as much as a small chunk."""
    if n not in cache:
        with torch.device("meta"):
            cache[n] = MemoryBranch(replace(c, vocab_size=n))
    return cache[n]


def _expert_rows(br: MemoryBranch, get: Callable[[str], torch.Tensor], lo: int, hi: int,
                 E_rows: torch.Tensor, out: torch.Tensor) -> None:
    """out[:] = T[lo:hi] of one layer, computed in out.dtype. br: a branch sized to the chunk
    (`_sized_branch`, hi-lo rows); get(name) returns the branch tensor `name` (MemoryBranch
    naming); E_rows = E[lo:hi] already in out.dtype. The chunk's tensors (cast once) are assigned
    to br, which is then evaluated ROWS local ids at a time, so only the chunk's rows of M_l are
    touched and G's temporaries stay small."""
    sd = {k: get(k)[lo:hi] if k == "memory.weight" else get(k) for k in br.state_dict() if k.startswith(FOLDED)}
    bad = br.load_state_dict({k: v.to(out.dtype) for k, v in sd.items()}, strict=False, assign=True).unexpected_keys
    assert not bad, bad
    for a in range(0, hi - lo, ROWS):
        b = min(a + ROWS, hi - lo)
        out[a:b] = br.expert(torch.arange(a, b), E_rows)


def _branch_config(branch: MemoryBranch) -> MekiConfig:
    """The MekiConfig fields a MemoryBranch is built from, read back from a live branch."""
    return MekiConfig(vocab_size=branch.memory.num_embeddings, d_model=branch.gate_proj.in_features,
                      d_mem=branch.memory.embedding_dim, norm_eps=branch.mix_norm.eps,
                      gate_on_residual=branch.dyn.norm is not None)


@torch.no_grad()
def fold_layer(branch: MemoryBranch, E: torch.Tensor, chunk: int = 4096,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """T_l [V, m] of one (live) layer branch, computed in `dtype`; E is the word embedding [V, d]."""
    c, sd = _branch_config(branch), branch.state_dict()
    T, branches = torch.empty(c.vocab_size, c.d_mem, dtype=dtype), {}
    for lo in range(0, c.vocab_size, chunk):
        hi = min(lo + chunk, c.vocab_size)
        br = _sized_branch(c, hi - lo, branches)
        _expert_rows(br, sd.__getitem__, lo, hi, E[lo:hi].to(dtype), T[lo:hi])
    return T


@torch.no_grad()
def fold_chunks(c: MekiConfig, tensors: Mapping[str, torch.Tensor], chunk: int = 4096,
                dtype: torch.dtype = torch.float32, progress: bool | None = None) -> Iterator[torch.Tensor]:
    """Stream the token-major table of every layer: yields [n, L*m] row blocks (n <= chunk),
    in token order, row t = [T_0[t] | T_1[t] | ... | T_{L-1}[t]] (docs/FORMAT.md).

    `tensors` holds checkpoint tensors (reference names, any dtype); only the current chunk's
    rows are cast. E's rows are cast once per chunk and shared by all layers, each layer's
    weights once per chunk; G_l then runs ROWS rows at a time. Big chunks keep the time in the
    three matmuls of G_l (2*(2*d*(d/2)) + 2*(d/2)*m flops per token and layer).
    progress: a tqdm bar on stderr; None = only when stderr is a terminal."""
    V, L, m = c.vocab_size, c.n_layer, c.d_mem
    E, branches = tensors["model.embed_tokens.weight"], {}
    bar = tqdm(total=V, desc="fold", unit="tok", unit_scale=True, disable=None if progress is None else not progress)
    with bar:
        for lo in range(0, V, chunk):
            hi = min(lo + chunk, V)
            E_rows = E[lo:hi].to(dtype)
            rows = torch.empty(hi - lo, L * m, dtype=dtype)
            br = _sized_branch(c, hi - lo, branches)
            for l in range(L):
                get = lambda k, p=f"model.layers.{l}.meki.": tensors[p + k]  # noqa: E731
                _expert_rows(br, get, lo, hi, E_rows, rows[:, l * m:(l + 1) * m])
            bar.update(hi - lo)
            yield rows
