"""MeKi on a GPU, on files the real converter wrote from official-layout checkpoints of both specs
and on a paper-shaped synthetic twin. `scripts/check_cuda` builds the patched llama.cpp for CUDA,
prepares the files and runs these (`pytest -m cuda`); with --vulkan the same tests run through the
Vulkan backend (a GPU's driver, or lavapipe here).

The arbiter is the model each file holds (parity.file_model: its tensors read back into the
PyTorch model, float64), as for the other targets' quantized tests: `scripts/check_cuda --prepare`
computed its greedy continuation and its logits where torch and our pins are. The GPU backend is
fed that continuation and held to those logits; the build's own CPU backend runs beside it, its
error printed for comparison. The
GPU machine's Python has other pins (torch 2.11, transformers 5), so these tests use numpy, gguf-py
and the build alone. Environment (set by scripts/check_cuda):
  MEKI_GPU_BIN        the build's bin folder (llama-logits, test-backend-ops)
  MEKI_GPU_DEVICE     the device's name in ggml (CUDA0, Vulkan0)
  MEKI_GPU_FILES      the folder `scripts/check_cuda --prepare` wrote (manifest.json)
  MEKI_GPU_PLACEMENT  a paper-shaped MeKi twin (meki_gguf.synth), for the placement test
  MEKI_GPU_LAVAPIPE   1 for Mesa's lavapipe (a dry run here): test-backend-ops as tests/test_targets.py runs it
Figures are printed: run with -s to see them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from meki_gguf import parity, runtime
from meki_gguf.parity import MAX_MEAN_KL, MAX_REL_ERR, MIN_TOP1
from llama_logs import DEVICE_OPS, LAVAPIPE_PARAMS, OUTSIDE_USE, backend_ops, model_buffers, split_inputs

pytestmark = pytest.mark.cuda

# f32 files: llama.cpp's CUDA backend multiplies f32 matrices in TF32 (10-bit mantissa) where it
# can: its mmf kernel for 9-16 columns (tensor-core mma.tf32, whatever the setting) and cuBLAS
# (its handle allows TF32; NVIDIA_TF32_OVERRIDE=0 turns that off). Up to 8 columns its matrix-vector
# kernel (mmvf) is plain f32. So f32 is held to the x86 bar with ubatches of at most 8 tokens and
# TF32 off; scripts/check_cuda also reports the f32 error with llama.cpp's defaults, for MeKi and
# for a dense file of the same backbone, which tells llama.cpp's arithmetic from the branch's.
# Vulkan: lavapipe's bar (tests/test_targets.py), its shaders' own rounding (docs/DEVICES.md).
F32_UBATCH = 7
F32_ENV = {"NVIDIA_TF32_OVERRIDE": "0"}
F32_MAX_REL_ERR = {"CUDA": MAX_REL_ERR, "Vulkan": parity.VULKAN_MAX_REL_ERR}


def setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set: scripts/check_cuda builds the GPU backend and runs these tests")
    return value


@pytest.fixture(scope="module")
def gpu() -> dict:
    folder = Path(setting("MEKI_GPU_FILES"))
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {name: {**f, "path": folder / f["path"], "logits": np.load(folder / f["logits"])}
             for name, f in manifest["files"].items()}
    return dict(bin=Path(setting("MEKI_GPU_BIN")), device=setting("MEKI_GPU_DEVICE"), prompt=manifest["prompt"],
                n_gen=manifest["n_gen"], files=files, placement=Path(setting("MEKI_GPU_PLACEMENT")))


def run(gpu: dict, path: Path, ngl: int, forced=(), n_ubatch: int = 16, env: dict | None = None):
    return parity.tool_greedy(gpu["bin"] / "llama-logits", path, gpu["prompt"], gpu["n_gen"], forced=forced,
                              n_ubatch=n_ubatch, args=["-ngl", str(ngl)], env={**os.environ, **(env or {})})


def against_file(gpu: dict, name: str, ngl: int, n_ubatch: int = 16, env: dict | None = None) -> parity.Parity:
    """A backend (-ngl 99: the GPU; 0: the CPU) fed the file model's greedy continuation, against its logits."""
    f = gpu["files"][name]
    got, logits, log = run(gpu, f["path"], ngl, forced=f["greedy"][:-1], n_ubatch=n_ubatch, env=env)
    if ngl:
        assert re.search(r"offloaded (\d+)/\1 layers to GPU", log), "not every layer is on the GPU"
    return parity.against(gpu["prompt"], got, logits, f["logits"], f["greedy"])


def names(kind: str) -> list[str]:
    """The manifest's files of one kind, for parametrize (read at collection: [] without the check)."""
    folder = os.environ.get("MEKI_GPU_FILES")
    if not folder or not (Path(folder) / "manifest.json").is_file():
        return ["(no MEKI_GPU_FILES)"]
    return [n for n, f in json.loads((Path(folder) / "manifest.json").read_text())["files"].items() if f["kind"] == kind]


@pytest.mark.parametrize("name", names("f32"))
def test_f32_matches_the_file(gpu, name):
    cpu = against_file(gpu, name, 0, n_ubatch=F32_UBATCH, env=F32_ENV)
    p = against_file(gpu, name, 99, n_ubatch=F32_UBATCH, env=F32_ENV)
    print(f"\n{name}, {F32_UBATCH}-token ubatches, TF32 off, vs the file's model: {gpu['device']} {p.summary()}; "
          f"the CPU backend: max rel logit error {cpu.max_rel_err:.2e}")
    assert p.max_rel_err <= F32_MAX_REL_ERR[re.sub(r"\d+$", "", gpu["device"])]
    assert p.top1 == 1.0
    assert p.greedy == p.greedy_ref


@pytest.mark.parametrize("name", names("quantized"))
def test_quantized_matches_the_file(gpu, name):
    """Quantized backbones and tables (q4_0's is scaled), in llama.cpp's default settings."""
    cpu = against_file(gpu, name, 0)
    p = against_file(gpu, name, 99)
    print(f"\n{name} vs the file's model: {gpu['device']} {p.summary()}; the CPU backend: mean KL {cpu.mean_kl:.2e}")
    assert p.top1_holds(MIN_TOP1)
    assert p.mean_kl <= MAX_MEAN_KL


def test_table_stays_on_the_host(gpu):
    """llama.cpp's own accounting, on a paper-shaped twin (Qwen's vocabulary): the table in a mapped
    host buffer, read lazily and prefetched; the backbone's layers in the device's buffer; per
    graph the scheduler copies the gathered rows to the device once, never the table."""
    path = gpu["placement"]
    _, tensors = runtime.read_header(path)
    mib = {name: t.nbytes / 2**20 for name, t in tensors.items()}
    table = mib.pop(runtime.TABLE)
    log = run(gpu, path, 99, env={"GGML_SCHED_DEBUG": "1"})[2]
    buffers = model_buffers(log)
    print(f"\nmodel buffers (MiB): {buffers}; table {table:.2f} MiB, backbone {sum(mib.values()):.2f} MiB")
    assert ("CPU_Mapped", round(table, 2)) in buffers, "the table is not in a mapped host buffer"
    device = sum(size for dev, size in buffers if dev == gpu["device"])
    layers = sum(size for name, size in mib.items() if name.startswith("blk."))
    # (llama.cpp prints MiB to 2 decimals)
    assert layers - 0.01 <= device <= sum(mib.values()) + 0.01, "the device holds more than the backbone, or not its layers"
    assert re.search(r"meki_mem\.weight \(size = \d+ MiB\) lazy read enabled", log)
    assert "enabling prefetch for 'meki_mem.weight'" in log
    graphs = split_inputs(log)
    assert graphs, "no scheduler log (GGML_SCHED_DEBUG=1)"
    token_kib = tensors[runtime.TABLE].shape[0] * 4 / 1024       # one token's rows of every layer, gathered as f32
    for g in graphs:
        assert not any(name == runtime.TABLE for _, name, _ in g)
        meki = [(backend, kib) for backend, name, kib in g if name.startswith("meki_mem")]
        assert [b for b, _ in meki] == [gpu["device"]], meki           # one copy per graph, to the device
        assert meki[0][1] <= 16 * token_kib + 1, meki                   # the largest ubatch's rows at most
    print(f"{len(graphs)} graphs; the gathered rows copied to the device per graph: "
          f"{sorted({kib for g in graphs for _, name, kib in g if name.startswith('meki_mem')})} KiB")


@pytest.mark.parametrize("ops,params", DEVICE_OPS, ids=[o.split(",")[0] if p is None else o for o, p in DEVICE_OPS])
def test_backend_ops(gpu, ops, params):
    # lavapipe (a dry run of the check here): its filters and one process per case, as in test_targets.py
    lavapipe = os.environ.get("MEKI_GPU_LAVAPIPE") == "1"
    params = LAVAPIPE_PARAMS.get(ops, params) if lavapipe else params
    passed, total, unsupported, failed = backend_ops(gpu["bin"] / "test-backend-ops", gpu["device"], ops, params,
                                                     per_case=lavapipe)
    print(f"\ntest-backend-ops -b {gpu['device']} -o {ops}{' -p ' + params if params else ''}: {passed}/{total} "
          f"cases passed, {len(unsupported)} not supported")
    assert not failed, failed[0]
    assert all(OUTSIDE_USE.search(u) for u in unsupported), [u for u in unsupported if not OUTSIDE_USE.search(u)]
