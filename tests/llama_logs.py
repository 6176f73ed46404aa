"""What the tests read from llama.cpp's own output, for every device test (test_targets.py: Vulkan on
lavapipe; test_rpc.py; test_cuda.py: a GPU): the model buffers of a load, the inputs the scheduler
copies between backends, and test-backend-ops on a device for the ops the MeKi graph runs there.
numpy and the standard library only (test_cuda.py runs where torch has other pins)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path


def model_buffers(log: str) -> list[tuple[str, float]]:
    """llama.cpp's load log: [(buffer type, MiB)] of the model's weights."""
    return [(dev, float(size)) for dev, size in re.findall(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", log)]


def split_inputs(log: str) -> list[list[tuple[str, str, int]]]:
    """ggml's scheduler log (GGML_SCHED_DEBUG=1): per graph, the inputs it copies between backends
    as (backend of the split, tensor name, KiB)."""
    graphs = []
    for m in re.finditer(r"^## SPLIT #(\d+): (\S+) # \d+ inputs:?(.*)$", log, re.M):
        if m.group(1) == "0":
            graphs.append([])
        graphs[-1] += [(m.group(2), name.strip(), int(kib))
                       for name, kib in re.findall(r"\[(.+?) \(\s*(\d+)K\)\]", m.group(3))]
    return graphs


def vk_perf_blocks(log: str) -> list[list[tuple[str, int]]]:
    """ggml-vulkan's perf logger (GGML_VK_PERF_LOGGER=1): per "Vulkan Timings:" block (one a graph,
    or a few), its dispatches as (name, count); fused ops under their fused names (MUL_MAT_ADD ...)."""
    return [[(name, int(n)) for name, n in re.findall(r"^(.+?): (\d+) x ", blk, re.M)]
            for blk in log.split("Vulkan Timings:")[1:]]


# The ops the MeKi graph runs on the device (GGML_SCHED_DEBUG=2 lists them), as test-backend-ops
# -o/-p filters: every case of the cheap ops; ROPE in MeKi's (Qwen3's) NEOX mode; SET_ROWS (the KV
# cache) into f32 and f16; MUL_MAT for the backbone types, matrix-vector and matrix-matrix (the
# suite's large MUL_MAT cases take hours on lavapipe). GET_ROWS covers every table type, views
# (the last layer's output rows are a view of the gathered rows) and ADD strided/broadcast inputs.
# The branch's two products with the ops their epilogues fuse (patches 0014-0017: MUL_MAT + SIGMOID
# + ADD, MUL_MAT + RMS_NORM + MUL + ADD), fused on the device against the CPU's unfused ops: every
# weight type in one column (fused) and the base types in several (not fused).
FUSED_OPS = "MUL_MAT_SIGMOID_ADD,MUL_MAT_RMS_NORM_MUL_ADD"
DEVICE_OPS = [("GET_ROWS,ADD,CONT,MUL,RMS_NORM,SIGMOID,SOFT_MAX,SWIGLU", None),
              ("SET_ROWS", "type_dst=(f32|f16),"),
              ("ROPE", "type=f32,.*mode=2,"),
              ("MUL_MAT", "type_a=(f32|f16|q8_0|q4_0),type_b=f32,m=16,n=(1|16),k=256,"),
              (FUSED_OPS, None)]
# on lavapipe, whose shader compiler takes minutes for each pipeline of the i-quants (their lookup
# tables), the fused cases of the other types: every type a backbone is quantized to but IQ*
LAVAPIPE_PARAMS = {FUSED_OPS: "type_a=(f32|f16|bf16|q1_0|q2_0|q4_0|q4_1|q5_0|q5_1|q8_0|mxfp4|nvfp4|q2_K|q3_K|q4_K|q5_K|q6_K|tq1_0|tq2_0),"}
# cases lavapipe refuses, outside MeKi's use: bf16 activations (MeKi's are f32); gathers of 70,000
# rows or index batches and ROPE over 8192-row batches (lavapipe's dispatch limits; MeKi's device-side
# gather picks at most n_ubatch rows, its ROPE sees n_ubatch tokens); MUL_MAT broadcasting src0
# over dim 3 (nr=[x,2]; MeKi's grouped-query attention broadcasts over dim 2)
OUTSIDE_USE = re.compile(r"type(_a)?=bf16|GET_ROWS\(.*(r=70000|be1=700)|ROPE\(.*ne_a=\[\d+,\d+,8192,|MUL_MAT\(.*nr=\[\d,2\]")


BASE_TYPES = {"f32", "f16", "q8_0", "q1_0", "q2_0", "q4_0", "q4_1", "q4_K", "mxfp4", "nvfp4", "iq2_xxs"}


def fused_cases(types: list[str]) -> list[tuple[str, str]]:
    """(op, vars) of test-backend-ops' MUL_MAT_SIGMOID_ADD and MUL_MAT_RMS_NORM_MUL_ADD cases for
    these weight types: one column, with and without the add, odd lengths; 16 columns for its base types."""
    cases = []
    for t in types:
        rms = lambda m, n, k, add, eps="0.000001": ("MUL_MAT_RMS_NORM_MUL_ADD", f"type_a={t},m={m},n={n},k={k},with_add={add},eps={eps}")  # noqa: E731
        sig = lambda m, n, k, add: ("MUL_MAT_SIGMOID_ADD", f"type_a={t},m={m},n={n},k={k},with_add={add}")  # noqa: E731
        cases += [sig(256, 1, 512, 0), rms(1024, 1, 256, 0), sig(256, 1, 512, 1), rms(1024, 1, 256, 1),
                  sig(67, 1, 256, 1), rms(1000, 1, 256, 1), rms(4096, 1, 512, 1, "0.000010")]
        if t in BASE_TYPES:
            cases += [sig(256, 16, 512, 1), rms(1024, 16, 256, 1)]
    return cases


def _backend_ops(exe: Path, device: str, ops: str, params: str | None, env: dict | None) -> tuple[int, int, list[str], str]:
    cmd = [str(exe), "test", "-b", device, "-o", ops] + (["-p", params] if params else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)   # a hang, not a slow machine
    out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    passed, total = (int(m.group(1)), int(m.group(2))) if m and r.returncode == 0 else (0, -1)
    return passed, total, [ln.strip() for ln in out.splitlines() if "not supported" in ln], out


def backend_ops(exe: Path, device: str, ops: str, params: str | None, env: dict | None = None,
                per_case: bool = False) -> tuple[int, int, list[str], list[str]]:
    """test-backend-ops on `device` (Vulkan0, CUDA0): (cases passed, cases run, cases not supported,
    the logs of the runs that failed). per_case (Vulkan): the matrix products run one process per
    case: lavapipe (Mesa 22.3) corrupts its heap now and then when one process runs many of these
    matrix-vector pipelines in a row (a SIGSEGV/SIGABRT inside libvulkan_lvp.so, or glibc's
    "corrupted double-linked list", with the stock tree as with ours); each case alone runs clean."""
    if not per_case or "MUL_MAT" not in ops:
        runs = [_backend_ops(exe, device, ops, params, env)]
    elif ops == FUSED_OPS and params:
        # test-backend-ops does not list the fused cases (its support mode leaves them out): each
        # case by its exact parameters, as make_test_cases_eval registers them (patches 0014/0015);
        # a case that is not there runs nothing, which fails the test
        types = re.match(r"type_a=\((.*)\),$", params).group(1).split("|")
        runs = [_backend_ops(exe, device, op, "^" + re.escape(case) + "$", env) for op, case in fused_cases(types)]
    else:
        listing = subprocess.run([str(exe), "support", "-b", device, "-o", ops, "-p", params],
                                 capture_output=True, text=True, env=env, timeout=300).stdout
        cases = re.findall(r"MUL_MAT\((.*)\): SUPPORTED", re.sub(r"\x1b\[[0-9;]*m", "", listing))
        if not cases:
            return 0, -1, [], [listing[-2000:]]
        runs = [_backend_ops(exe, device, ops, "^" + re.escape(c) + "$", env) for c in cases]
    failed = [r[3][-2000:] for r in runs if r[0] != r[1] or r[1] <= 0]
    return sum(r[0] for r in runs), sum(r[1] for r in runs), [u for r in runs for u in r[2]], failed
