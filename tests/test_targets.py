"""The patched llama.cpp on the other targets (docs/DEVICES.md), against the PyTorch reference and
the x86 build:

* ARM64: cross-compiled for a phone-class CPU (armv8.2-a+dotprod+fp16), run under qemu-aarch64
  as a Cortex-A76 (exactly that baseline: no SVE, no i8mm), so the NEON/dot-product kernels run;
* Vulkan: Mesa's lavapipe, a software Vulkan device, with all layers or half of them offloaded.

Each build's `llama-logits` tool (cpp/tools/logits) evaluates a prompt in one decode call split
into ubatches, then greedy 1-token steps, and writes its logits; parity.py compares them. Builds:
`scripts/build_llama.py --target aarch64` and `--vulkan` (`scripts/check_targets` runs both and
these tests). Figures are printed: run with -s to see them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from meki_gguf import parity, runtime
from meki_gguf.parity import MAX_MEAN_KL, MAX_REL_ERR, MIN_TOP1
from meki_gguf.quantize import quantize
from llama_logs import DEVICE_OPS, LAVAPIPE_PARAMS, OUTSIDE_USE, backend_ops, model_buffers, split_inputs, vk_perf_blocks
from meki_models import TINY, build

ROOT = Path(__file__).resolve().parents[1]
BUILDS = {"x86": (runtime.LLAMA_BIN, ""),                          # scripts/install.sh runs it
          "aarch64": (ROOT / "build" / "aarch64" / "bin", "--target aarch64"),
          "vulkan": (ROOT / "build" / "vulkan" / "bin", "--vulkan")}
# ggml-vulkan skips CPU-type devices such as lavapipe unless they are listed; f16 off as in
# upstream's lavapipe CI (lavapipe's f16 arithmetic is emulated)
VK_ENV = {**os.environ, "GGML_VK_VISIBLE_DEVICES": "0", "GGML_VK_DISABLE_F16": "1"}
N_GEN = 32
# (backbone, table); q8_0+q4_0: two tiers, a third of the rows in q8_0 by a random row order
QUANTIZED = [("f16", "q8_0"), ("q4_0", "q4_0"), ("q4_0", "q8_0+q4_0")]

pytestmark = pytest.mark.targets


def tool(target: str, name: str = "llama-logits") -> Path:
    folder, flag = BUILDS[target]
    exe = folder / name
    assert exe.is_file(), f"no {target} build of {name} in {folder}: run scripts/build_llama.py {flag}".rstrip()
    return exe


@pytest.fixture(scope="session")
def qemu() -> list[str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_llama import qemu_cmd    # the CPU qemu emulates is the build's, written once
    cmd = qemu_cmd()
    if cmd and shutil.which(cmd[0]) is None:
        pytest.skip("qemu-aarch64 is not installed (Debian: apt-get install qemu-user): the ARM64 build cannot run here")
    return cmd


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """variant -> (reference, {(backbone, table): GGUF}, checkpoint) for the released variant and its opposite
    (the local spec, QK-norm, untied), so both specs, both attention paths and both output heads run
    on each target."""
    cache = {}

    def get(v):
        if v not in cache:
            te, qk, tied = v
            root = tmp_path_factory.mktemp(f"targets-{int(te)}{int(qk)}{int(tied)}")
            ckpt, paths = build(root, tok, replace(TINY, dyn_norm=te, qk_norm=qk, tied=tied),
                                types=(("f32", "f32"), ("f16", "q8_0")))
            paths["q4_0", "q4_0"] = quantize(paths["f32", "f32"], root / "q4_0-q4_0.gguf", "q4_0", "q4_0")
            paths["q4_0", "q8_0+q4_0"] = quantize(paths["f32", "f32"], root / "tiers.gguf", "q8_0", "q4_0",
                                                  cold_type="q4_0", hot_rows=TINY.vocab_size // 3,
                                                  row_order=np.random.default_rng(0).permutation(TINY.vocab_size))
            cache[v] = parity.reference(ckpt), paths, ckpt
        return cache[v]
    return get


RELEASED, OPPOSITE = (True, False, True), (False, True, False)


def check_reference(p: parity.Parity, max_rel_err: float) -> None:
    assert p.max_rel_err <= max_rel_err
    assert p.top1 == 1.0
    assert p.greedy == p.greedy_ref


def check_quantized(p: parity.Parity) -> None:
    assert p.top1_holds(MIN_TOP1)
    assert p.mean_kl <= MAX_MEAN_KL


# --- ARM64 under qemu ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [RELEASED, OPPOSITE], ids=["te-noqk-tied", "local-qk-untied"])
def test_aarch64_f32_matches_reference(files, prompt, qemu, variant):
    ref, paths, _ = files(variant)
    p = parity.against_reference(ref, prompt, *parity.tool_greedy(tool("aarch64"), paths["f32", "f32"], prompt,
                                                                    N_GEN, emulator=qemu)[:2])
    print(f"\nARM64 f32 vs reference: {p.summary()}")
    check_reference(p, MAX_REL_ERR)


def residency(path: Path, exe: Path, emulator: list[str] = (), args: list[str] = (), env=None) -> dict:
    """The measurement of test_runtime.py's test_table_not_resident_after_generation, through a
    build's llama-logits: drop the file from the page cache, run a 4-token warm-up (it faults the
    backbone in; the kernel's read-around of the last backbone tensor spills into the table), then
    16 tokens spread over the vocabulary + 16 greedy steps, and count the table's cached pages."""
    off, nbytes = runtime.table_range(path)
    n_vocab, page = runtime.read_header(path)[1][runtime.TABLE].shape[1], os.sysconf("SC_PAGE_SIZE")
    run = dict(emulator=emulator, args=args, env=env)
    runtime.evict(path)
    assert runtime.resident_pages(path, off, nbytes)[0] == 0, "eviction failed: is the file on tmpfs?"
    warm_ids = [1, 2, 3, 4]
    parity.tool_greedy(exe, path, warm_ids, 1, **run)
    warm, total = runtime.resident_pages(path, off, nbytes)
    ids = [(i * 9973 + 5) % n_vocab for i in range(1, 17)]               # distinct rows, far apart
    greedy, _, log = parity.tool_greedy(exe, path, ids, 16, **run)
    after, _ = runtime.resident_pages(path, off, nbytes)
    new = len(set(ids + greedy[:-1]) - set(warm_ids))
    return dict(total=total, row_bytes=nbytes // n_vocab, warm=warm, after=after, new_rows=new,
                per_row=-(-(nbytes // n_vocab) // page) + 1, log=log)


def check_residency(f: dict, strict: bool = True) -> None:
    """Load + warm-up leave the table uncached; strict: gathering reads the rows it needs, nothing else."""
    print(f"table {f['total']} pages, {f['row_bytes']} B rows: {f['warm']} pages cached after load and a 4-token "
          f"warm-up, {f['after']} after {f['new_rows']} more distinct rows were gathered")
    assert f["warm"] < f["total"] / 4
    if strict:
        assert f["after"] - f["warm"] <= f["new_rows"] * f["per_row"] + 8
        assert f["after"] < f["total"] / 4


# qemu-user drops madvise hints (only MADV_DONTNEED/WIPEONFORK pass: linux-user/mmap.c, target_madvise),
# so under qemu the kernel reads ahead around each row the ARM64 build faults in, as it would for
# any build without llama.cpp's MADV_RANDOM. Measured here: the x86 build with madvise turned into
# a no-op (this shim, LD_PRELOAD) caches the same pages as the ARM64 build under qemu.
NO_MADVISE = """#include <stddef.h>
int madvise(void *a, size_t n, int advice) { (void) a; (void) n; (void) advice; return 0; }
int posix_madvise(void *a, size_t n, int advice) { (void) a; (void) n; (void) advice; return 0; }
"""


def test_aarch64_table_stays_lazy(big, qemu, tmp_path):
    """The ARM64 loader maps the table lazily (load + a 4-token run leave it uncached, where a
    resident table would be read whole), and gathering rows touches the pages the x86 build
    touches: the same page-cache footprint as x86 without madvise hints, which is what qemu runs."""
    shim = tmp_path / "no_madvise.so"
    (tmp_path / "no_madvise.c").write_text(NO_MADVISE)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", shim, tmp_path / "no_madvise.c"], check=True)
    arm = residency(big, tool("aarch64"), qemu)
    x86_hintless = residency(big, tool("x86"), env={**os.environ, "LD_PRELOAD": str(shim)})
    x86 = residency(big, tool("x86"))
    for name, f in (("x86", x86), ("x86 without madvise", x86_hintless), ("ARM64 under qemu", arm)):
        print(f"\n{name}: ", end="")
        check_residency(f, strict=f is x86)
    assert "meki_mem.weight (size = 148 MiB) lazy read enabled" in arm["log"]
    assert "enabling prefetch for 'meki_mem.weight'" in arm["log"]
    assert abs(arm["after"] - x86_hintless["after"]) <= 0.05 * x86_hintless["after"] + 64


# --- Vulkan on lavapipe -------------------------------------------------------------------------

def vk_args(ngl: int) -> dict:
    return dict(args=["-ngl", str(ngl)], env=VK_ENV)


@pytest.mark.parametrize("ngl", [99, 2], ids=["all-layers", "half-the-layers"])
@pytest.mark.parametrize("variant", [RELEASED, OPPOSITE], ids=["te-noqk-tied", "local-qk-untied"])
def test_vulkan_f32_matches_reference(files, prompt, variant, ngl):
    ref, paths, _ = files(variant)
    greedy, logits, log = parity.tool_greedy(tool("vulkan"), paths["f32", "f32"], prompt, N_GEN, **vk_args(ngl))
    assert f"offloaded {min(ngl, TINY.n_layer + 1)}/{TINY.n_layer + 1} layers to GPU" in log
    p = parity.against_reference(ref, prompt, greedy, logits)
    print(f"\nVulkan (lavapipe, -ngl {ngl}) f32 vs reference: {p.summary()}")
    check_reference(p, parity.VULKAN_MAX_REL_ERR)


@pytest.mark.parametrize("ngl", [99, 2], ids=["all-layers", "half-the-layers"])
def test_vulkan_table_stays_on_the_host(big, ngl):
    """llama.cpp's own accounting: the device buffers hold the backbone, the table stays in the
    mapped file (lazy, prefetched, only its gathered rows cached), and per ubatch the scheduler
    copies the gathered rows to the device (1 KiB per token and layer here), never the table."""
    _, tensors = runtime.read_header(big)
    mib = {name: t.nbytes / 2**20 for name, t in tensors.items()}
    table = mib.pop(runtime.TABLE)
    f = residency(big, tool("vulkan"), args=["-ngl", str(ngl)], env={**VK_ENV, "GGML_SCHED_DEBUG": "1"})
    print(f"\nVulkan (lavapipe, -ngl {ngl}): ", end="")
    check_residency(f)
    log = f["log"]
    buffers = model_buffers(log)
    print(f"model buffers (MiB): {buffers}; table {table:.2f} MiB, backbone {sum(mib.values()):.2f} MiB")
    assert ("CPU_Mapped", round(table, 2)) in buffers, "the table is not in a mapped host buffer"
    device = sum(size for dev, size in buffers if dev == "Vulkan0")
    # the CPU's extra buffer types hold repacked second copies of weights the CPU multiplies (on an
    # AMX CPU: the tied output matrix, the token embedding's duplicate): backbone, never the table
    extra = sum(size for dev, size in buffers if dev in ("AMX", "CPU_REPACK"))
    once = sum(size for dev, size in buffers if dev not in ("AMX", "CPU_REPACK"))
    assert 0 < device < table and abs(once - table - sum(mib.values())) < 0.05 and extra <= sum(mib.values()) + 0.05
    assert "meki_mem.weight (size = 148 MiB) lazy read enabled" in log
    assert "enabling prefetch for 'meki_mem.weight'" in log

    graphs = split_inputs(log)
    layers_on_device = 1 if ngl == 2 else TINY.n_layer
    row_kib = 128 * 4 / 1024                                  # d_mem 128, f32 rows
    for g in graphs:
        assert not any(name == runtime.TABLE for _, name, _ in g)
        meki = [(backend, name, kib) for backend, name, kib in g if name.startswith("meki_mem")]
        assert [b for b, _, _ in meki] == ["Vulkan0"], meki           # one copy per graph, to the device
        # at most the gathered rows of the layers on the device for the largest ubatch (16 tokens)
        assert meki[0][2] <= 16 * layers_on_device * row_kib, meki
    sizes = sorted({kib for g in graphs for _, name, kib in g if name.startswith("meki_mem")})
    print(f"{len(graphs)} graphs; the gathered rows copied to the device per graph: {sizes} KiB")


@pytest.mark.parametrize("ops,params", DEVICE_OPS, ids=[o.split(",")[0] if p is None else o for o, p in DEVICE_OPS])
def test_vulkan_backend_ops(ops, params):
    params = LAVAPIPE_PARAMS.get(ops, params)
    passed, total, unsupported, failed = backend_ops(tool("vulkan", "test-backend-ops"), "Vulkan0", ops, params, VK_ENV,
                                                   per_case=True)
    print(f"\ntest-backend-ops -b Vulkan0 -o {ops}{' -p ' + params if params else ''}: {passed}/{total} cases passed, "
          f"{len(unsupported)} not supported by lavapipe")
    assert not failed, failed[0]
    assert all(OUTSIDE_USE.search(u) for u in unsupported), [u for u in unsupported if not OUTSIDE_USE.search(u)]


def vk_dispatches(path: Path, reorder: bool, env: dict | None = None) -> dict[str, int]:
    """One decode step on lavapipe: {dispatch: count} from ggml-vulkan's perf logger, fused ops by
    their fused names (MUL_MAT_ADD ...); in the graph's own node order (the order CUDA runs it in)
    or in ggml-vulkan's reordering (its default)."""
    env = {**VK_ENV, **(env or {}), "GGML_VK_PERF_LOGGER": "1"}
    if not reorder:
        env["GGML_VK_DISABLE_GRAPH_OPTIMIZE"] = "1"
    log = parity.tool_greedy(tool("vulkan"), path, [1, 2, 3, 4], 2, args=["-ngl", "99"], env=env)[2]
    return dict(vk_perf_blocks(log)[-1])


@pytest.mark.parametrize("reorder", [False, True], ids=["graph-order", "reordered"])
def test_vulkan_branch_dispatches(tmp_path, reorder):
    """The branch costs 2 dispatches a layer in decode, its two products with their epilogues fused
    (MUL_MAT_SIGMOID_ADD: the gate's sigmoid and the table row's add; MUL_MAT_RMS_NORM_MUL_ADD: the
    output norm, its weight and the residual add), and 2 a graph (the gather's layer-major copy and
    the last layer's rows), in the graph's order and in ggml-vulkan's reordering; the FFN's down
    projection keeps its fused residual add, as in the dense twin (meki.cpp builds the branch first
    for that). Without the two fusions (GGML_VK_DISABLE_MMV_*_FUSION) the branch is 5 a layer in
    graph order and 6 reordered (docs/BENCHMARKS.md, "On a GPU")."""
    from meki_gguf.synth import Shape, write_model
    from meki_gguf.tokenizer import tokenizer_kv
    kv = tokenizer_kv(ROOT / "build" / "src" / "models" / "ggml-vocab-qwen2.gguf", 151680)
    shape = Shape("meki-small", n_layer=4, d=512, m=64, ff=1536, n_head=8, n_kv_head=4, head_dim=64)
    meki_file, dense_file = (write_model(s, tmp_path / f"{s.name}.gguf", "q8_0", "q8_0", tokenizer_kv=kv)
                             for s in (shape, shape.dense()))
    meki, dense = vk_dispatches(meki_file, reorder), vk_dispatches(dense_file, reorder)
    off = {"GGML_VK_DISABLE_MMV_SIGMOID_FUSION": "1", "GGML_VK_DISABLE_MMV_RMS_NORM_FUSION": "1"}
    before = vk_dispatches(meki_file, reorder, off)
    fused = {k: n for k, n in meki.items() if k.startswith("MUL_MAT_")}
    print(f"\ndecode dispatches on lavapipe, {'reordered' if reorder else 'graph order'}: MeKi {sum(meki.values())} "
          f"(without the branch's fusions {sum(before.values())}), dense {sum(dense.values())}; fused {fused}")
    assert {k: n for k, n in fused.items() if k.startswith("MUL_MAT_ADD")} == \
        {k: n for k, n in dense.items() if k.startswith("MUL_MAT_ADD")}
    assert sum(n for k, n in fused.items() if k.startswith("MUL_MAT_SIGMOID_ADD")) == shape.n_layer
    assert sum(n for k, n in fused.items() if k.startswith("MUL_MAT_RMS_NORM_MUL_ADD")) == shape.n_layer
    assert sum(meki.values()) - sum(dense.values()) == 2 * shape.n_layer + 2
    assert sum(before.values()) - sum(dense.values()) == (6 if reorder else 5) * shape.n_layer + 2


def test_vulkan_from_python(files, prompt):
    """llama-cpp-python on the Vulkan build through LLAMA_CPP_LIB_PATH (docs/DEVICES.md): every
    layer on the device, the greedy tokens of the CPU build."""
    _, paths, _ = files(RELEASED)
    code = ("import json, sys; from meki_gguf import parity; "
            "llm = parity.open_llama(sys.argv[1], n_gpu_layers=99, verbose=True); "
            "print('greedy:', json.dumps(parity.llama_greedy(llm, json.loads(sys.argv[2]), 16)[0]))")
    r = subprocess.run([sys.executable, "-c", code, str(paths["f32", "f32"]), json.dumps(prompt)],
                       capture_output=True, text=True, timeout=300,
                       env={**VK_ENV, "LLAMA_CPP_LIB_PATH": str(BUILDS["vulkan"][0])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"offloaded {TINY.n_layer + 1}/{TINY.n_layer + 1} layers to GPU" in r.stderr
    greedy = json.loads(r.stdout.split("greedy:", 1)[1])
    cpu, _, _ = parity.tool_greedy(tool("x86"), paths["f32", "f32"], prompt, 16)
    print(f"\nllama-cpp-python on the Vulkan build: greedy {sum(a == b for a, b in zip(greedy, cpu))}/16 tokens as the CPU build's")
    assert greedy == cpu


# --- quantized files: each backend against the model the file holds -----------------------------
# A quantized file's reference is parity.file_model: the file's tensors dequantized into the PyTorch
# model (float64). Against it, a backend's error is its own kernels' rounding; the quantization's own
# error (q4_0 here: mean KL 2.7e-2 from the float reference) is the same for every backend and is
# not theirs. The backends round differently by design: the CPU's integer dot products quantize the
# activations (q8_0 for q4_0 and q8_0 weights; repacked, AMX or plain kernels alike), lavapipe's
# Vulkan shaders dequantize the weights and compute in f32. Measured on q4_0: the x86 CPU at mean KL
# 2.0e-4 from the file's model, Vulkan at 6.5e-8. Held to each other (as before), the CPU's
# rounding sat in Vulkan's bar: one flip of 81 positions on a CPU without AMX failed it.

# backend -> (build, tool_greedy's args and env); x86 with and without the repacked (or AMX) weights
BACKENDS = {"x86": ("x86", {}), "x86-no-repack": ("x86", dict(args=["--no-repack"])), "aarch64": ("aarch64", {}),
            "vulkan": ("vulkan", vk_args(99))}


@pytest.fixture(scope="module")
def file_runs(files, prompt):
    """types -> (the file model's greedy continuation, its logits over the prompt and it): the
    sequence every backend is fed, and the logits it is held to."""
    cache = {}

    def get(types):
        if types not in cache:
            _, paths, ckpt = files(RELEASED)
            cache[types] = parity.file_run(ckpt, paths[types], prompt, N_GEN)
        return cache[types]
    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("types", QUANTIZED, ids=lambda t: "-".join(t))
def test_quantized_matches_the_file(request, files, file_runs, prompt, types, backend):
    """The backend fed the file's model's own greedy continuation (one sequence for all, whatever the
    CPU): top-1 with the reference's near ties and mean KL within the quantized bars."""
    build, run = BACKENDS[backend]
    emulator = request.getfixturevalue("qemu") if build == "aarch64" else ()
    _, paths, _ = files(RELEASED)
    greedy, expected = file_runs(types)
    got, logits, _ = parity.tool_greedy(tool(build), paths[types], prompt, N_GEN, forced=greedy[:-1], emulator=emulator,
                                        **run)
    p = parity.against(prompt, got, logits, expected, greedy)
    print(f"\n{backend} vs the file's model, {'/'.join(types)}: {p.summary()}")
    check_quantized(p)
