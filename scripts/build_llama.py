#!/usr/bin/env python3
"""Fetch, patch, build and install the pinned llama.cpp.

The pin is the `llama-cpp-python==X` requirement in pyproject.toml (the only place it is
written): that release's sdist carries the llama.cpp tree we patch. Steps, each skipped when
its inputs did not change, so a re-run with nothing changed takes seconds (a failure names
its step):

  1. download the sdist into build/dl/ and unpack it (pristine, never edited);
  2. check that cpp/ (new files) and patches/llama.cpp/*.patch apply to it;
  3. lay the patched tree out in build/src/ (only files whose content changes are rewritten, so
     the build stays incremental) and build libllama and the tools in build/cmake/ (ccache is
     used when installed); the checkout first builds a *stock* libllama once into build/stock/
     (tests check that it refuses MeKi files);
  4. checkout (scripts/install.sh): install the stock llama-cpp-python Python package (its own
     llama.cpp build switched off) and copy our shared libraries into it, so the binding and the
     tools share one build; install gguf-py and llama.cpp's conversion package from the same tree.
     wheel (--package DIR, run by CMakeLists.txt when pip or `python -m build` builds meki-gguf):
     copy the libraries, the tools and that Python code into DIR, which the wheel carries as
     meki_gguf/llama/ (meki_gguf/native.py finds it).

$CMAKE_ARGS (as llama-cpp-python reads it: -DGGML_VULKAN=ON, -DGGML_CUDA=ON, ...) is passed to
step 3's configure, in the checkout and in the wheel alike.

Other targets build the same patched tree (docs/DEVICES.md), each into its own folder, tools in
build/<target>/bin; they are for the tools (and for llama-cpp-python through LLAMA_CPP_LIB_PATH):
  --target aarch64   cross-compiled for a phone-class ARM64 CPU (armv8.2-a+dotprod+fp16) with
                     Debian's aarch64-linux-gnu toolchain; run under qemu-aarch64 on x86;
  --vulkan           the Vulkan backend (Mesa's lavapipe runs it without a GPU);
  --cuda             the CUDA backend for the GPU the machine has (nvidia-smi's compute capability,
                     or $CUDAARCHS), flash attention's kernels off (scripts/check_cuda);
  --ctest            llama.cpp's own test suite (ctest; LLAMA_BUILD_TESTS) built and run in the patched
                     x86 tree; a test that fails is built and run again in the stock tree
                     (build/stock-tests) to tell upstream's failures from ours (scripts/check_llama_tests);
  --sanitize         built with clang, AddressSanitizer + UndefinedBehaviorSanitizer and libFuzzer's
                     coverage instrumentation (build/asan): the library, llama-cli, llama-server,
                     llama-quantize, llama-perplexity, llama-logits and the load-path fuzzer
                     tests/fuzz/fuzz_load.cpp
                     (scripts/check_reliability runs the tests and the fuzzer against it).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
SRC = BUILD / "src"            # patched llama.cpp tree
CMAKE_DIR = BUILD / "cmake"    # build of the patched tree
STOCK = BUILD / "stock"        # stock libllama + ggml, for the "stock llama.cpp refuses" test
PY_PKG = BUILD / "py-binding"  # llama-cpp-python's Python package as released (without vendor/)

# the tools the wheel carries; the checkout also builds test-backend-ops and ggml-rpc-server (rpc-server) for its tests
PACKAGE_TOOLS = ["llama-cli", "llama-server", "llama-bench", "llama-quantize", "llama-perplexity", "llama-logits"]
TOOLS = [*PACKAGE_TOOLS, "test-backend-ops", "ggml-rpc-server"]
# the libraries llama-cpp-python's loader opens by their unversioned name (lib<name>.so)
BINDING_LIBS = ["llama", "ggml", "mtmd"]
# the other targets: the command-line tools without the server (and the multimodal library the
# server and llama-cli pull in), which would double their build time
TARGET_TOOLS = ["llama-completion", "llama-bench", "llama-quantize", "llama-perplexity", "test-backend-ops",
                "llama-logits"]
CMAKE_FLAGS = [
    "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",          # libs and tools find each other wherever copied
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",   # offline: no web-UI download
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
]


# A phone-class ARM64 CPU: ARMv8.2-A with the dot-product and half-precision extensions is what
# every phone SoC since ~2018 has (Cortex-A55/A75 and later); no SVE (few phones have it, and
# qemu's default 512-bit SVE is unlike any phone) and no i8mm (ARMv8.6, phones since ~2021).
ARM64_ARCH = "armv8.2-a+dotprod+fp16"
QEMU_CPU = "cortex-a76"          # a qemu CPU with exactly that baseline: v8.2, dotprod, fp16, no SVE/i8mm
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
TARGETS = {  # name -> (extra CMake flags, Debian packages it needs)
    "aarch64": ([
        "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
        "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
        f"-DCMAKE_FIND_ROOT_PATH={AARCH64_SYSROOT}", "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={ARM64_ARCH}",
        f"-DCMAKE_CROSSCOMPILING_EMULATOR=qemu-aarch64;-cpu;{QEMU_CPU};-L;{AARCH64_SYSROOT}",
    ], ["gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "qemu-user"]),
    # lavapipe is a CPU-type Vulkan device: ggml-vulkan uses it only with GGML_VK_VISIBLE_DEVICES set
    "vulkan": (["-DGGML_VULKAN=ON"], ["libvulkan-dev", "glslc", "spirv-headers", "mesa-vulkan-drivers"]),
    # for the GPU of the machine (cuda_arch); CUDA's flash-attention kernels are most of the build's
    # time and no MeKi check uses them (llama-logits runs without; llama-bench's auto falls back)
    "cuda": (["-DGGML_CUDA=ON", "-DGGML_CUDA_FA=OFF"], []),
}


def build_target(target: str, jobs: int) -> None:
    """The tools of another target (TARGETS) from the laid-out tree in SRC, into build/<target>/bin.
    scripts/check_cuda calls it on a GPU machine with a tree laid out here and carried there."""
    flags = TARGETS[target][0]
    if target == "cuda":
        flags = [*flags, f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch()}", *cuda_toolkit_flags()]
    with step(3, f"build the patched llama.cpp for {target}"):
        cmake_build(SRC, BUILD / target, ["llama", *TARGET_TOOLS], jobs, flags)
    log(f"done: tools in build/{target}/bin")


def cuda_arch() -> str:
    """CMAKE_CUDA_ARCHITECTURES: $CUDAARCHS (CMake's own variable for it), else the compute
    capability nvidia-smi reports for this machine's GPU (9.0 -> 90: an H100/H200)."""
    if os.environ.get("CUDAARCHS"):
        return os.environ["CUDAARCHS"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: --cuda: no NVIDIA GPU found ({e}); set CUDAARCHS (e.g. 90) to build for one elsewhere")
    return ";".join(sorted({cap.replace(".", "") for cap in out}))


def cuda_toolkit_flags() -> list[str]:
    """What a CUDA toolkit without cuBLAS or the driver needs to build ggml-cuda (a machine without a
    GPU that only compiles, scripts/check_cuda_build; none on a GPU machine): NVIDIA's cuBLAS wheel
    for nvcc's major version (pip download, once, into build/dl/cublas-<major>), and no VMM pool
    where there is no libcuda.so to link (ggml-cuda then allocates with cudaMalloc)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("error: --cuda: no nvcc on PATH")
    toolkit = Path(nvcc).resolve().parents[1]
    flags = []
    if not any(toolkit.glob("**/cublas_v2.h")):
        major = re.search(r"release (\d+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout).group(1)
        wheel_dir = BUILD / "dl" / f"cublas-{major}"
        if not any(wheel_dir.glob("**/cublas_v2.h")):
            log(f"no cuBLAS in {toolkit}: fetching NVIDIA's cuBLAS wheel for CUDA {major} into {wheel_dir.relative_to(ROOT)}")
            name = "nvidia-cublas" if int(major) >= 13 else f"nvidia-cublas-cu{major}"
            with tempfile.TemporaryDirectory() as tmp:
                run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, f"{name}>={major},<{int(major) + 1}"])
                import zipfile
                with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
                    z.extractall(wheel_dir)
        include = next(wheel_dir.glob("**/cublas_v2.h")).parent
        lib = include.parent / "lib"
        for name in ("cublas", "cublasLt"):
            link = lib / f"lib{name}.so"
            if not link.exists():
                link.symlink_to(next(lib.glob(f"lib{name}.so.*")).name)
        flags += [f"-DCUDA_cublas_LIBRARY={lib / 'libcublas.so'}", f"-DCUDA_cublasLt_LIBRARY={lib / 'libcublasLt.so'}",
                  f"-DCMAKE_CUDA_FLAGS=-I{include}", f"-DCMAKE_CXX_FLAGS=-I{include}"]
    import ctypes.util
    if not any(toolkit.glob("**/libcuda.so")) and ctypes.util.find_library("cuda") is None:
        flags.append("-DGGML_CUDA_NO_VMM=ON")
    return flags


# The sanitizer build. Every binary uses clang's *shared* ASan runtime, so that the tools and a
# Python process (which gets the runtime through LD_PRELOAD) use the same one; the libraries also
# carry libFuzzer's coverage instrumentation, so one build serves the tests and the fuzzer.
SANITIZE_TOOLS = ["llama-cli", "llama-server", "llama-quantize", "llama-perplexity", "llama-logits"]
SANITIZE_CFLAGS = "-fsanitize=fuzzer-no-link -gline-tables-only"
SANITIZE_PACKAGES = ["clang", "libclang-rt-14-dev", "libfuzzer-14-dev"]


def asan_runtime() -> Path:
    """clang's shared ASan runtime (LD_PRELOAD it to load the sanitized libllama into Python)."""
    return Path(subprocess.check_output(["clang", f"-print-file-name=libclang_rt.asan-{os.uname().machine}.so"], text=True).strip())


def sanitize_flags() -> list[str]:
    link = f"-shared-libasan -Wl,-rpath,{asan_runtime().parent}"
    return ["-DCMAKE_C_COMPILER=clang", "-DCMAKE_CXX_COMPILER=clang++",
            "-DLLAMA_SANITIZE_ADDRESS=ON", "-DLLAMA_SANITIZE_UNDEFINED=ON",
            "-DGGML_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_UNDEFINED=ON",
            f"-DCMAKE_C_FLAGS={SANITIZE_CFLAGS}", f"-DCMAKE_CXX_FLAGS={SANITIZE_CFLAGS}",
            f"-DCMAKE_EXE_LINKER_FLAGS={link}", f"-DCMAKE_SHARED_LINKER_FLAGS={link}"]


def build_fuzzer(out: Path) -> None:
    """tests/fuzz/fuzz_load.cpp against the sanitized libllama: a libFuzzer binary in out/bin."""
    src, exe = ROOT / "tests" / "fuzz" / "fuzz_load.cpp", out / "bin" / "fuzz-load"
    if exe.exists() and exe.stat().st_mtime > max(src.stat().st_mtime, (out / "bin" / "libllama.so").stat().st_mtime):
        return
    run(["clang++", "-std=c++17", "-O1", "-gline-tables-only", "-fsanitize=fuzzer,address,undefined",
         "-shared-libasan", f"-Wl,-rpath,{asan_runtime().parent}", "-Wl,-rpath,$ORIGIN",
         f"-I{SRC / 'include'}", f"-I{SRC / 'ggml' / 'include'}", str(src), "-o", str(exe),
         f"-L{out / 'bin'}", "-lllama", "-lggml", "-lggml-base"])


def qemu_cmd() -> list[str]:
    """How to run an aarch64 tool on this machine (empty on an ARM64 host)."""
    return [] if os.uname().machine == "aarch64" else ["qemu-aarch64", "-cpu", QEMU_CPU, "-L", str(AARCH64_SYSROOT)]


def apt_install(packages: list[str]) -> None:
    """Install the missing Debian packages (as install.sh does for ccache), or say which are missing."""
    missing = [p for p in packages
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
        run(["apt-get", "install", "-y", "-qq", *missing], stdout=subprocess.DEVNULL,
            env={"DEBIAN_FRONTEND": "noninteractive"})
    else:
        sys.exit(f"error: this target needs the Debian packages {' '.join(missing)}: install them (as root)")


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


@contextmanager
def step(n: int, what: str):
    """One step of the build; a failing command ends the build naming the step."""
    log(f"step {n}: {what}")
    try:
        yield
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: meki-gguf build, step {n} ({what}) failed: `{' '.join(str(c) for c in e.cmd[:3])} ...` "
                 f"exited with status {e.returncode}; its output is above")


def user_cmake_args() -> list[str]:
    """$CMAKE_ARGS, llama-cpp-python's way of choosing the backend (-DGGML_VULKAN=ON, ...)."""
    return shlex.split(os.environ.get("CMAKE_ARGS", ""))


def main_flags() -> list[str]:
    """The checkout's and the wheel's build (and the stock one beside it): with llama.cpp's RPC
    backend (rpc-server, the tools' --rpc: a model's layers on other machines, docs/DEVICES.md),
    then $CMAKE_ARGS."""
    return ["-DGGML_RPC=ON", *user_cmake_args()]


def run(cmd: list[str], **kw) -> None:
    log(" ".join(str(c) for c in cmd))
    env = dict(os.environ, CCACHE_BASEDIR=str(ROOT), **kw.pop("env", {}))
    subprocess.run(cmd, check=True, env=env, **kw)


def pinned_version() -> str:
    # a regex, not tomllib: the wheel's build may run on Python 3.10
    m = re.search(r'^\s*"llama-cpp-python\s*==\s*([\w.]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if not m:
        sys.exit("error: pyproject.toml must pin llama-cpp-python==X in its dependencies")
    return m.group(1)


def fetch_sdist(version: str) -> Path:
    """build/dl/llama_cpp_python-X/ (pristine)."""
    dl = BUILD / "dl"
    tree = dl / f"llama_cpp_python-{version}"
    if (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return tree
    tgz = dl / f"llama_cpp_python-{version}.tar.gz"
    if not tgz.exists():
        # --no-build-isolation: reading the sdist's metadata must not build cmake from source
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             "--no-build-isolation", f"llama-cpp-python=={version}", "-d", str(dl)])
    log(f"unpacking {tgz.name}")
    with tarfile.open(tgz) as tf:
        tf.extractall(dl, filter="tar")
    return tree


PATCHES = ROOT / "patches" / "llama.cpp"


def patch_header(p: Path) -> dict:
    """A patch's header, the commit message above its diff (as git format-patch writes it, which
    git apply skips): subject, body, and its trailers: Kind (meki: the architecture; fix: a
    general fix; perf: a backend's general fusion; tool: meki-gguf's own test tool), New-file (files of cpp/ that belong to it),
    Upstream-has (FILE: TEXT, upstream's own form of the change) and Requires (FILE: TEXT, the
    upstream code the patch changes, which older trees lack)."""
    head = p.read_text().split("\ndiff --git ", 1)[0].removesuffix("\n---")
    lines = head.splitlines()
    trailer = re.compile(r"(Kind|New-file|Upstream-has|Requires): ")
    trailers = [ln.split(": ", 1) for ln in lines if trailer.match(ln)]
    body = "\n".join(ln for ln in lines[1:] if not trailer.match(ln)).strip()
    return {"subject": lines[0], "body": body, "kind": next(v for k, v in trailers if k == "Kind"),
            "new_files": [v for k, v in trailers if k == "New-file"],
            "upstream_has": next((v for k, v in trailers if k == "Upstream-has"), None),
            "requires": next((v for k, v in trailers if k == "Requires"), None)}


def series(tree: Path) -> tuple[list[Path], dict[str, str]]:
    """The patches `tree` needs, in order, and {name: why not} for the others: a patch whose change
    the tree has already (its Upstream-has file contains the text: 0009 on llama.cpp b11434), and
    one for code the tree does not have yet (its Requires file lacks the text: 0012 on the pin)."""
    def has(tree_text: str) -> bool:
        rel, text = tree_text.split(": ", 1)
        return (tree / rel).is_file() and text in (tree / rel).read_text(errors="replace")

    patches, skipped = [], {}
    for p in sorted(PATCHES.glob("*.patch")):
        h = patch_header(p)
        if h["upstream_has"] is not None and has(h["upstream_has"]):
            skipped[p.name] = f"upstream has it ({h['upstream_has']})"
        elif h["requires"] is not None and not has(h["requires"]):
            skipped[p.name] = f"the tree has no {h['requires']}"
        else:
            patches.append(p)
    return patches, skipped


def tree_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for base in paths:
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
        for p in files:
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def patched_files(pristine: Path, patches: list[Path], overlay: Path | None) -> dict[str, bytes]:
    """{relative path: content} of every file that the overlay adds or the patches change."""
    touched = set()
    for p in patches:
        touched |= {m.group(1) for m in re.finditer(r"^\+\+\+ b/(\S+)", p.read_text(), re.M)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rel in touched:
            if (pristine / rel).exists():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(pristine / rel, tmp / rel)
        if overlay is not None and overlay.exists():
            for f in overlay.rglob("*"):
                if f.is_file():
                    rel = str(f.relative_to(overlay))
                    touched.add(rel)
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, tmp / rel)
        for p in patches:
            try:
                subprocess.run(["git", "apply", "--whitespace=nowarn", str(p)], cwd=tmp, check=True,
                               capture_output=True, text=True)
            except subprocess.CalledProcessError as e:
                sys.exit(f"error: {p.relative_to(ROOT)} does not apply to the pinned source: {e.stderr.strip()}")
        return {rel: (tmp / rel).read_bytes() for rel in sorted(touched) if (tmp / rel).exists()}


def sync_tree(pristine: Path, dest: Path, files: dict[str, bytes]) -> bool:
    """Make dest = pristine + files, rewriting only what differs. Returns True if anything changed."""
    manifest = dest / ".meki-patched"
    if not dest.exists():
        log(f"copying pristine tree to {dest.relative_to(ROOT)}")
        # no .git: the sdist's submodule pointer makes cmake's build-info call git in vain
        shutil.copytree(pristine, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    before = set(manifest.read_text().split()) if manifest.exists() else set()
    changed = False
    for rel in before - set(files):             # no longer patched: back to pristine
        if (pristine / rel).exists():
            # a new mtime (not copy2's, the sdist's): the build must see the file change back
            shutil.copy(pristine / rel, dest / rel)
        else:
            (dest / rel).unlink(missing_ok=True)
        changed = True
    for rel, data in files.items():
        target = dest / rel
        if not target.exists() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            changed = True
    manifest.write_text("\n".join(sorted(files)) + "\n")
    return changed


def cmake_build(src: Path, build_dir: Path, targets: list[str], jobs: int, extra: list[str] = ()) -> None:
    # CMake keeps every -D it was once given: when the flags change (say $CMAKE_ARGS lost
    # -DGGML_VULKAN=ON), configure afresh rather than keep the old ones (ccache keeps it fast)
    flags = [*CMAKE_FLAGS, *extra]
    used = build_dir / ".meki-flags"
    if used.exists() and used.read_text() != "\n".join(flags):
        log(f"the CMake flags changed: configuring {build_dir.name} afresh")
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    used.write_text("\n".join(flags))             # before: a failed configure's flags count too
    run(["cmake", "-S", str(src), "-B", str(build_dir), *flags], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets])


def build_stock(pristine_llama: Path, jobs: int) -> None:
    """A stock libllama from the untouched tree (same build dir, before patching: its ggml
    objects are then reused by the patched build)."""
    if (STOCK / "libllama.so").exists():
        return
    log("building the stock libllama (once)")
    sync_tree(pristine_llama, SRC, {})
    cmake_build(SRC, CMAKE_DIR, ["llama"], jobs, main_flags())
    STOCK.mkdir(parents=True, exist_ok=True)
    for lib in (CMAKE_DIR / "bin").glob("lib*.so*"):
        shutil.copy2(lib, STOCK / lib.name, follow_symlinks=False)


# llama.cpp's tests that need the network, which these machines lack: a model download and the
# tests that run that model, and a git clone of Hugging Face's ggml-org/vocabs
CTEST_OFFLINE = "^(test-download-model|test-thread-safety|test-state-restore-fragmented|test-tokenizers-ggml-vocabs)$"
STOCK_TESTS = BUILD / "stock-tests"   # the stock tree and its build, for the failures' second run


def ctest_targets(build_dir: Path) -> list[str]:
    """The test programs of llama.cpp's suite: the build's test-* targets (ctest knows a test's
    program only once it is built)."""
    listed = subprocess.check_output(["cmake", "--build", str(build_dir), "--target", "help"], text=True)
    return sorted(name for line in listed.splitlines() if (name := line.split(":")[0].strip()).startswith("test-"))


def run_ctest(build_dir: Path, only: list[str] | None = None) -> list[str]:
    """Run the suite (or the tests named in `only`) in build_dir; the names of those that failed."""
    cmd = ["ctest", "--test-dir", str(build_dir), "--output-on-failure", "--timeout", "1200", "-E", CTEST_OFFLINE,
           "-FA", CTEST_OFFLINE]                    # nor as another test's fixture
    if only:
        cmd += ["-R", "^(" + "|".join(re.escape(t) for t in only) + ")$"]
    log(" ".join(cmd))
    r = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(r.stdout, flush=True)
    failed = r.stdout.split("The following tests FAILED:", 1)
    return re.findall(r"^\s*\d+ - (\S+) \(", failed[1], re.M) if len(failed) == 2 else []


def ctest(src: Path, build_dir: Path, pristine: Path, stock: Path, jobs: int) -> None:
    """llama.cpp's suite on the patched tree `src` (built in `build_dir`); the failures again on
    the stock tree `pristine` (copied and built in `stock`). Exits non-zero if a test fails on the
    patched tree only (ours), or the stock tree could not settle it."""
    cmake_build(src, build_dir, ["llama"], jobs, main_flags())               # configure, the library
    targets = ctest_targets(build_dir)
    run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets])
    failed = run_ctest(build_dir)
    if not failed:
        log(f"llama.cpp's suite passes on the patched tree ({len(targets)} test programs; "
            f"not run: {CTEST_OFFLINE} (network))")
        return
    log(f"failed on the patched tree: {', '.join(failed)}; running them on the stock tree")
    sync_tree(pristine, stock / "src", {})
    cmake_build(stock / "src", stock / "cmake", ["llama"], jobs, main_flags())
    run(["cmake", "--build", str(stock / "cmake"), "-j", str(jobs), "--target",
         *sorted(set(targets) & set(ctest_targets(stock / "cmake")))])
    upstream = set(run_ctest(stock / "cmake", failed))
    ours = [t for t in failed if t not in upstream]
    log(f"fail on the stock tree too (upstream's): {', '.join(sorted(upstream)) or 'none'}; "
        f"on the patched tree only (ours): {', '.join(ours) or 'none'}")
    if ours:
        sys.exit(f"error: llama.cpp's tests fail on the patched tree only: {', '.join(ours)}")


def stamp_ok(name: str, digest: str) -> bool:
    f = BUILD / f".stamp-{name}"
    return f.exists() and f.read_text() == digest


def stamp(name: str, digest: str) -> None:
    (BUILD / f".stamp-{name}").write_text(digest)


def pip(*args: str, **kw) -> None:
    run([sys.executable, "-m", "pip", "install", "-q", *args], **kw)


def install_python(sdist: Path) -> None:
    """The checkout's .venv: the stock binding with our libraries copied in, gguf-py, conversion."""
    libs = sorted((CMAKE_DIR / "bin").glob("lib*.so*"))
    digest = hashlib.sha256((tree_hash(*libs) + tree_hash(SRC / "gguf-py", SRC / "conversion")).encode()).hexdigest()
    if stamp_ok("python", digest + sys.prefix):
        log("python packages up to date")
        return
    # the binding's Python code as released; its own llama.cpp build is switched off: ours is copied in
    if not PY_PKG.exists():
        shutil.copytree(sdist, PY_PKG, ignore=shutil.ignore_patterns("vendor"), symlinks=True)
        (PY_PKG / "vendor").mkdir()
    pip("scikit-build-core>=0.9", "cmake", "ninja")
    pip("--no-build-isolation", "--force-reinstall", "--no-deps", str(PY_PKG),
        env={"CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"})
    pkg = Path(subprocess.check_output([sys.executable, "-c",
               "import importlib.util as u; print(u.find_spec('llama_cpp').submodule_search_locations[0])"],
               text=True).strip())
    (pkg / "lib").mkdir(exist_ok=True)
    for lib in libs:
        dst = pkg / "lib" / lib.name
        dst.unlink(missing_ok=True)
        shutil.copy2(lib, dst, follow_symlinks=False)
    log(f"installed llama-cpp-python with the patched libraries into {pkg}")
    # gguf-py and llama.cpp's conversion code (tokenizer conversion) from the same pinned tree
    pip("--no-deps", "--force-reinstall", str(SRC / "gguf-py"))
    pip("--no-deps", "--force-reinstall", str(SRC))
    stamp("python", digest + sys.prefix)


def package(dest: Path) -> None:
    """The wheel's payload (meki_gguf/llama/ once installed), rebuilt in dest:
    bin/     the tools and shared libraries (the tools find the libraries through RUNPATH $ORIGIN).
             A wheel holds no symlinks, so each library is there under its SONAME, and the ones
             llama-cpp-python opens by name also as lib<name>.so (a copy; the dynamic linker
             matches the SONAME, so one copy is loaded);
    python/  gguf-py (patched: the MeKi constants) and llama.cpp's conversion package."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "bin").mkdir(parents=True)
    built = CMAKE_DIR / "bin"
    for lib in sorted(built.glob("lib*.so*")):
        if lib.is_symlink():
            continue
        soname = re.search(r"SONAME\)\s+Library soname: \[([^\]]+)\]",
                           subprocess.check_output(["readelf", "-d", str(lib)], text=True))
        names = {soname.group(1) if soname else lib.name}
        stem = re.match(r"lib(.+?)\.so", lib.name).group(1)
        if stem in BINDING_LIBS:
            names.add(f"lib{stem}.so")
        for name in names:
            shutil.copy2(lib, dest / "bin" / name)
    for tool in PACKAGE_TOOLS:
        shutil.copy2(built / tool, dest / "bin" / tool)
    shutil.copytree(SRC / "gguf-py" / "gguf", dest / "python" / "gguf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(SRC / "conversion", dest / "python" / "conversion",
                    ignore=shutil.ignore_patterns("__pycache__"))
    log(f"packaged {len(list((dest / 'bin').iterdir()))} tools and libraries and the Python code in {dest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--target", choices=["x86_64", "aarch64"], default=os.uname().machine,
                    help="CPU to build for (aarch64: cross-compiled on x86, into build/aarch64)")
    ap.add_argument("--vulkan", action="store_true", help="the Vulkan backend, into build/vulkan")
    ap.add_argument("--cuda", action="store_true",
                    help="the CUDA backend for this machine's GPU, into build/cuda (scripts/check_cuda)")
    ap.add_argument("--sanitize", action="store_true",
                    help="clang with ASan + UBSan and the load-path fuzzer, into build/asan")
    ap.add_argument("--ctest", action="store_true",
                    help="build and run llama.cpp's own test suite on the patched tree (and the failures on the stock tree)")
    ap.add_argument("--check-patches", action="store_true",
                    help="only check that cpp/ and patches/ apply to the pinned source")
    ap.add_argument("--package", type=Path, metavar="DIR",
                    help="build for the wheel and put its payload in DIR (CMakeLists.txt runs this)")
    args = ap.parse_args()

    BUILD.mkdir(exist_ok=True)
    lock = open(BUILD / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)     # one build at a time: concurrent ninja runs corrupt its log

    version = pinned_version()
    with step(1, f"download the llama-cpp-python {version} source"):
        sdist = fetch_sdist(version)
    pristine = sdist / "vendor" / "llama.cpp"
    patches, skipped = series(pristine)
    with step(2, "apply cpp/ and patches/ to its llama.cpp"):
        files = patched_files(pristine, patches, ROOT / "cpp")
    log(f"llama-cpp-python {version}: {len(patches)} patches and "
        f"{sum(1 for _ in (ROOT / 'cpp').rglob('*.*'))} new files apply to the pinned source"
        + "".join(f"; {name} not needed: {why}" for name, why in skipped.items()))
    if args.check_patches:
        return

    if args.ctest:
        sync_tree(pristine, SRC, files)
        ctest(SRC, CMAKE_DIR, pristine, STOCK_TESTS, args.jobs)
        return
    if args.sanitize:
        if args.vulkan or args.target != os.uname().machine:
            sys.exit("error: --sanitize builds for this machine's CPU only")
        apt_install(SANITIZE_PACKAGES)
        sync_tree(pristine, SRC, files)
        cmake_build(SRC, BUILD / "asan", ["llama", *SANITIZE_TOOLS], args.jobs, sanitize_flags())
        build_fuzzer(BUILD / "asan")
        log("done: sanitized library, tools and fuzzer in build/asan/bin")
        return
    other = "vulkan" if args.vulkan else "cuda" if args.cuda else args.target if args.target != os.uname().machine else None
    if other:           # the same tree for another target: the tools only, in build/<target>/bin
        if (args.vulkan or args.cuda) and args.target != os.uname().machine:
            sys.exit(f"error: --{other} builds for this machine's CPU only")
        apt_install(TARGETS[other][1])
        sync_tree(pristine, SRC, files)
        build_target(other, args.jobs)
        return

    with step(3, "build the patched llama.cpp (libllama and the tools)"):
        if not args.package:
            build_stock(pristine, args.jobs)
        sync_tree(pristine, SRC, files)
        cmake_build(SRC, CMAKE_DIR, ["llama", *(PACKAGE_TOOLS if args.package else TOOLS)], args.jobs, main_flags())
    if args.package:
        with step(4, f"copy the build into the wheel ({args.package})"):
            package(args.package)
        return
    with step(4, "install llama-cpp-python, gguf-py and the conversion package into this environment"):
        install_python(sdist)
    log(f"done: tools in {(CMAKE_DIR / 'bin').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
