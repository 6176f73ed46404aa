#!/usr/bin/env bash
# Set-up, idempotent: a virtual environment in .venv with the patched llama.cpp
# (llama-cpp-python + the CLI tools) and this package. A re-run with nothing changed takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

# ccache makes rebuilds from a fresh clone fast; optional
if ! command -v ccache >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq ccache) >/dev/null 2>&1 || echo "note: ccache not installed; builds are not cached"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch: the CPU build (an unpinned torch pulls a multi-GB CUDA build);
# scikit-build-core: reads llama-cpp-python's sdist and installs its Python package
.venv/bin/pip install -q "torch==2.13.0" "scikit-build-core>=0.9" cmake ninja
.venv/bin/python scripts/build_llama.py
# this package, editable; its build (CMakeLists.txt) runs build_llama.py --package, the wheel's path,
# which finds the build above up to date
.venv/bin/pip install -q --no-build-isolation -e ".[convert,test]"
