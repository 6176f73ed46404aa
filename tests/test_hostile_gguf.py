"""The load-path fuzzer's files (tests/fuzz/, docs/RELIABILITY.md) through the x86 build, as a user
meets them: `meki-gguf generate FILE` in a fresh process, so that an abort fails one test instead
of the run. Every seed (gate variants, QK-norm, tied/untied, table types) loads and generates;
every file that once crashed the load path is refused by llama.cpp (through llama-cpp-python, with
no check of ours in front) with its reason, and by `meki-gguf generate` in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))

from make_corpus import HOSTILE, LOADED, REGRESSIONS, SEEDS  # noqa: E402


def generate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meki_gguf.cli", "generate", str(path), "-p", "Hi", "-n", "4",
                           "--temp", "0"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_generates(name):
    r = generate(FUZZ / "corpus" / f"{name}.gguf")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", sorted(LOADED))
def test_ub_found_by_the_fuzzer_loads_with_a_warning(name):
    """The value that reached undefined behaviour only describes the file: it loads, says so, and
    runs (the sanitized build's replay of the file, scripts/check_reliability step 2, is the UB check)."""
    path = FUZZ / "regressions" / name
    r = subprocess.run([sys.executable, "-c", "import sys, llama_cpp; llama_cpp.Llama(sys.argv[1], n_ctx=16)", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and LOADED[name][2] in r.stderr, (r.returncode, r.stderr[-2000:])
    assert generate(path).returncode == 0


@pytest.mark.parametrize("name", sorted(REGRESSIONS) + sorted(HOSTILE))
def test_crash_found_by_the_fuzzer_or_a_hostile_file_is_a_load_error(name):
    path = FUZZ / "regressions" / name
    r = subprocess.run([sys.executable, "-c", "import sys, llama_cpp; llama_cpp.Llama(sys.argv[1], n_ctx=16)", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "ValueError: Failed to load model" in r.stderr, (r.returncode, r.stderr[-2000:])
    assert {**REGRESSIONS, **HOSTILE}[name][2] in r.stderr   # llama.cpp's log (verbose by default)
    r = generate(path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr[-2000:])
