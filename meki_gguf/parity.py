"""The PyTorch reference vs llama.cpp on the same checkpoint (used by the tests and `meki-gguf demo`).

One prompt goes through llama.cpp in a single llama_decode call that it splits into several
ubatches, then its greedy continuation runs as 1-token decode steps. The reference (model.py, in
training form and float64: the arbiter) sees the same tokens, and at every position:

* relative logit error  max_i |l_i - r_i| / max_i |r_i|   (l: llama.cpp's logits at that position,
  r: the reference's). Relative to the position's largest reference logit, so it is scale-free and
  does not blow up where single logits are near zero. `max_rel_err` is its maximum over positions.
* top-1 agreement: the fraction of positions whose argmax agrees. A disagreement where the
  reference's two candidates are nearer than the position's largest logit error (a near tie,
  which any rounding may flip) is counted apart (`near_ties`): `top1_holds` counts it as agreement.
* KL(P_ref || P_llama) in nats, the softmax distributions of both; `mean_kl` averages positions.

The greedy check compares llama.cpp's continuation with the reference's own greedy continuation
(`MekiForCausalLM.generate_greedy`). The bars: an f32 GGUF with an f32 KV cache -> max_rel_err
<= MAX_REL_ERR and identical greedy tokens; f16 backbone + q8_0 table -> top-1 >= MIN_TOP1 and
mean KL <= MAX_MEAN_KL (`top1_holds`).

torch is imported only where the reference runs: comparing two llama.cpp runs (`tool_greedy`,
`against`) needs numpy alone, as on a GPU machine whose Python has other pins (scripts/check_cuda).
"""
from __future__ import annotations

import copy
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import runtime

if TYPE_CHECKING:
    import torch

    from .model import MekiForCausalLM

GGML_TYPE_F32 = 0                   # llama.cpp's KV cache type for exact comparisons
# the bars (issue 3): an f32 GGUF with an f32 KV cache, and an f16 backbone with a q8_0 table
MAX_REL_ERR = 1e-4
MIN_TOP1, MAX_MEAN_KL = 0.99, 1e-3
# f32 on Vulkan (lavapipe): its shaders' own rounding, ~3e-4 on MeKi and ~9e-4 on a dense qwen3
# file of the same backbone (docs/DEVICES.md)
VULKAN_MAX_REL_ERR = 1e-3


def reference(ckpt, dtype: torch.dtype | None = None) -> MekiForCausalLM:
    """The training-form model of a checkpoint.Checkpoint (nothing folded), in `dtype` (float64)."""
    import torch

    from .model import MekiForCausalLM
    dtype = dtype or torch.float64
    model = MekiForCausalLM(ckpt.config).to(dtype)
    model.load_state_dict({k: ckpt.tensors[k].to(dtype) for k in ckpt.tensors})
    return model.eval()


def open_llama(path: str | Path, *, n_ubatch: int = 16, n_batch: int = 64, n_ctx: int = 256, **kw):
    """llama.cpp set up for comparisons: logits at every position, f32 KV cache, small ubatches,
    no flash attention (llama.cpp's CPU flash attention rounds to f16 inside: ~1e-3 relative
    logit error on any model, whatever the KV cache type)."""
    kw = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32, "flash_attn": False, **kw}
    return runtime.load(path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, logits_all=True, **kw)


def rel_err(logits: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position (row): max |logits - ref| / max |ref|."""
    return np.abs(logits - ref).max(-1) / np.abs(ref).max(-1)


def near_ties(logits: np.ndarray, ref: np.ndarray) -> int:
    """Positions whose argmax disagrees where the reference prefers its own top token to
    llama.cpp's by less than the position's largest logit error: both are within rounding."""
    pos = np.nonzero(logits.argmax(-1) != ref.argmax(-1))[0]
    ours, theirs = ref.argmax(-1)[pos], logits.argmax(-1)[pos]
    gap = ref[pos, ours] - ref[pos, theirs]
    return int((gap <= np.abs(logits[pos] - ref[pos]).max(-1)).sum())


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Per row, in x's float type."""
    x = np.asarray(x)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(ref: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per position (row): KL(softmax(ref) || softmax(logits)) in nats, in float64."""
    lp, lq = log_softmax(np.asarray(ref, np.float64)), log_softmax(np.asarray(logits, np.float64))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def llama_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens from llama.cpp and its logits at every position it evaluated
    (prompt + the first n-1 generated tokens). `llm` needs logits_all=True."""
    llm.reset()
    llm.eval(prompt)                                  # one decode call, split into ubatches
    out = []
    for i in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if i < n - 1:
            llm.eval(out[-1:])                        # a 1-token decode step
    return out, np.array(llm.scores[:llm.n_tokens], dtype=np.float64)


def tool_greedy(exe: str | Path, path: str | Path, prompt: list[int], n: int, *, forced: list[int] = (),
                emulator: list[str] = (), n_ubatch: int = 16, n_batch: int = 64, n_ctx: int = 256,
                args: list[str] = (), env: dict | None = None, timeout: float = 600) -> tuple[list[int], np.ndarray, str]:
    """llama_greedy through the llama-logits tool of a build (another CPU under `emulator`, a GPU
    backend through `args` such as ["-ngl", "99"]), with the settings of `open_llama`. With `forced`
    (n - 1 tokens) the decode steps feed those instead of the tool's own choices, so that two builds
    evaluate the same sequence. Returns (greedy tokens, logits, the tool's log)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.f32"
        cmd = [*emulator, str(exe), "-m", str(path), "-p", ",".join(map(str, prompt)), "-n", str(n),
               "-o", str(out), "-b", str(n_batch), "-ub", str(n_ubatch), "-c", str(n_ctx), *args]
        if forced:
            cmd += ["-f", ",".join(map(str, forced))]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:len(emulator) + 1])} failed ({r.returncode}): {r.stderr[-2000:]}")
        greedy = [int(t) for t in r.stdout.split("greedy:")[1].split()]
        logits = np.fromfile(out, dtype=np.float32).reshape(len(prompt) + n - 1, -1)
    return greedy, logits.astype(np.float64), r.stderr


def file_model(ckpt, path: str | Path, dtype: torch.dtype | None = None) -> MekiForCausalLM:
    """The model a GGUF holds, in PyTorch: `ckpt`'s architecture in folded form with every tensor
    read back from the file and dequantized (gguf-py), the table times its scales. A backend running
    the file computes this model up to its own kernels' rounding (activations quantized for the
    integer dot products, other summation orders): against it, a backend's error is its own; the
    quantization's error is this model's against `reference`."""
    import gguf
    import torch

    from .model import MekiForCausalLM
    from .quantize import COLD, ROW_ORDER, TABLE, file_scales
    from .write import gguf_name
    dtype = dtype or torch.float64

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def values(name: str) -> torch.Tensor:            # [rows, cols], torch's order
        t = tensors[name]
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        return torch.from_numpy(np.array(x, np.float64).reshape([int(n) for n in reversed(t.shape)]))

    c = copy.deepcopy(ckpt.config)
    c.folded = True
    model = MekiForCausalLM(c).to(dtype)
    table, m = values(TABLE), c.d_mem                   # [V, L*m], token-major
    if COLD in tensors:                                 # two tiers: the rows in the row order
        table = torch.cat([table, values(COLD)])
        if ROW_ORDER in reader.fields:
            table = table[torch.from_numpy(np.asarray(reader.fields[ROW_ORDER].contents(), np.int64))]
    if (scales := file_scales(reader)) is not None:
        table = table * torch.from_numpy(scales.astype(np.float64))
    state = {}
    for name in model.state_dict():
        if name.endswith(".meki.table"):
            il = int(name.split(".")[2])
            state[name] = table[:, il * m:(il + 1) * m]
        else:
            g = gguf_name(name)
            state[name] = values("token_embd.weight" if g == "output.weight" and g not in tensors else g)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.eval()


def file_run(ckpt, path: str | Path, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """The model a GGUF holds (`file_model`) on `prompt`: `greedy_run`."""
    return greedy_run(file_model(ckpt, path), prompt, n)


def greedy_run(model: MekiForCausalLM, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """A model's n greedy tokens after `prompt`, and its logits over the prompt and the first n-1 of
    them: the sequence a backend is fed (`tool_greedy`'s forced) and the logits it is held to."""
    greedy = model.generate_greedy(prompt, n)
    return greedy, reference_logits(model, prompt + greedy[:-1])


def reference_logits(model: MekiForCausalLM, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@dataclass
class Parity:
    n_prompt: int
    rel_err: np.ndarray                  # per position
    kl: np.ndarray                       # per position
    top1: float                          # fraction of positions whose argmax agrees
    greedy: list[int]                    # llama.cpp's greedy continuation
    greedy_ref: list[int]                # the reference's
    near_ties: int = 0                   # disagreements at the reference's near ties

    def top1_holds(self, min_top1: float = MIN_TOP1) -> bool:
        """top-1 >= min_top1, a disagreement at a near tie of the reference counted as agreement:
        on a few dozen positions of a tiny model one such flip would otherwise fail a 99% bar."""
        return self.top1 + self.near_ties / len(self.rel_err) >= min_top1

    @property
    def max_rel_err(self) -> float:
        return float(self.rel_err.max())

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean())

    @property
    def greedy_same(self) -> int:
        """How many leading greedy tokens agree."""
        return next((i for i, (a, b) in enumerate(zip(self.greedy, self.greedy_ref)) if a != b), len(self.greedy))

    def summary(self) -> str:
        return (f"{len(self.rel_err)} positions ({self.n_prompt} prompt + {len(self.greedy) - 1} decode steps): "
                f"max rel logit error {self.max_rel_err:.2e}, top-1 {self.top1:.2%} ({self.near_ties} near-tie flips), "
                f"mean KL {self.mean_kl:.2e}, "
                f"greedy {self.greedy_same}/{len(self.greedy)} tokens identical")


def compare(llm, model: MekiForCausalLM, prompt: list[int], n_gen: int = 32) -> Parity:
    """Run `prompt` + n_gen greedy tokens through llama.cpp (`open_llama`) and the reference."""
    return against_reference(model, prompt, *llama_greedy(llm, prompt, n_gen))


def against(prompt: list[int], greedy: list[int], logits: np.ndarray, base: np.ndarray, greedy_base: list[int]) -> Parity:
    """Parity of one llama.cpp build against another's logits `base` over the same sequence
    (`tool_greedy` with forced=greedy_base[:-1])."""
    return Parity(n_prompt=len(prompt), rel_err=rel_err(logits, base), kl=kl(base, logits),
                  top1=float((logits.argmax(-1) == base.argmax(-1)).mean()), greedy=greedy, greedy_ref=greedy_base,
                  near_ties=near_ties(logits, base))


def against_reference(model: MekiForCausalLM, prompt: list[int], greedy: list[int], logits: np.ndarray) -> Parity:
    """Parity of llama.cpp's greedy continuation and logits (llama_greedy, tool_greedy) against the reference."""
    n_gen = len(greedy)
    ref = reference_logits(model, prompt + greedy[:-1])
    # The reference is causal: its argmax after prompt + greedy[:i] is its greedy token i as long
    # as both continuations agree so far, so one forward pass settles them; it generates on its
    # own only from the first disagreement.
    choice = ref[len(prompt) - 1:].argmax(-1)
    same = next((i for i in range(n_gen) if choice[i] != greedy[i]), n_gen)
    greedy_ref = greedy[:same] + (model.generate_greedy(prompt + greedy[:same], n_gen - same) if same < n_gen else [])
    return Parity(n_prompt=len(prompt), rel_err=rel_err(logits, ref), kl=kl(ref, logits),
                  top1=float((logits.argmax(-1) == ref.argmax(-1)).mean()),
                  greedy=greedy, greedy_ref=greedy_ref, near_ties=near_ties(logits, ref))
