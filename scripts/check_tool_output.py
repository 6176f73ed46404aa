#!/usr/bin/env python3
"""The llama.cpp tools' last lines are never lost: llama-perplexity --kl-divergence and llama-cli
run many times under two loads, and every run's output must be complete.

    .venv/bin/python scripts/check_tool_output.py [--runs 100] [--cli-runs 20]

Why: the tools print through llama.cpp's logger (common/log.cpp), a queue that a worker thread
writes out; the logger is never torn down, so whatever the worker has not written when main()
returns is lost. llama-perplexity's KL summary and llama-cli's last tokens are the last lines.
Patch 0011 flushes the logger when the two tools return (llama-server already did).

The loads:
  busy      the tool on one CPU core that a busy loop shares (the issue's reproduction: 23 of 100
            runs lost the summary there; this kernel's scheduler lets the worker catch up: 0 of 50);
  slow-log  the logger's worker slowed down (tests/slow_log.c, LD_PRELOAD: 2 ms before each line it
            flushes), which without patch 0011 loses the summary and the tokens in every run.
Each llama-perplexity run (the embedded demo, -c 128 --chunks 8 -t 1, against the demo's own saved
logits) must print every line of the KL summary; each llama-cli run (-v, 16 greedy tokens, end of
generation ignored) must log all 16 "next token" lines. Exit status 1 if any run is incomplete.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meki_gguf.demo import EMBEDDED  # noqa: E402
from meki_gguf.runtime import llama_tool  # noqa: E402

TEXT = Path("/usr/share/common-licenses/GPL-3")
# the KL summary's lines, in the order llama-perplexity prints them (kl_divergence() in perplexity.cpp)
HEADERS = ["Perplexity statistics", "KL divergence statistics", "Token probability statistics"]
FIGURES = ["Mean PPL(Q)", "Mean PPL(base)", "Cor(ln(PPL(Q)), ln(PPL(base)))", "Mean ln(PPL(Q)/PPL(base))",
           "Mean PPL(Q)/PPL(base)", "Mean PPL(Q)-PPL(base)", "Mean    KLD", "Maximum KLD", "99.9%   KLD",
           "Median  KLD", "Minimum KLD", "Mean    Δp", "Maximum Δp", "Minimum Δp", "RMS Δp", "Same top p"]
SUMMARY = [re.compile(f"^====== {re.escape(h)} ======$", re.M) for h in HEADERS] + \
          [re.compile(f"^{re.escape(x)}\\s*: ", re.M) for x in FIGURES]
CORE = "0"
N_CLI = 16


def preloaded(shim: Path) -> dict:
    """The environment with the shim preloaded after what is preloaded already (a sanitizer
    runtime must stay first)."""
    return {**os.environ, "LD_PRELOAD": " ".join(filter(None, [os.environ.get("LD_PRELOAD"), str(shim)]))}


@contextlib.contextmanager
def load(name: str, shim: Path):
    """The environment of the tools' runs under `name`; a busy loop on CORE while it lasts."""
    p = subprocess.Popen(["taskset", "-c", CORE, sys.executable, "-c", "while True: pass"]) if name == "busy" else None
    try:
        yield preloaded(shim) if name == "slow-log" else None
    finally:
        if p:
            p.kill()
            p.wait()


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", CORE, *cmd]


def perplexity_complete(cmd: list[str], env) -> bool:
    r = subprocess.run(pinned(cmd), capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({r.returncode}):\n{r.stderr[-2000:]}")
    out = r.stdout + r.stderr
    return all(p.search(out) for p in SUMMARY)


def cli_complete(cmd: list[str], env) -> bool:
    r = subprocess.run(pinned(cmd), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, env=env)
    if r.returncode != 0:
        raise SystemExit(f"llama-cli failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return len(re.findall(r"next token:\s+\d+", r.stderr)) == N_CLI


def run(name: str, n: int, check, cmd: list[str], env) -> int:
    t0, lost = time.monotonic(), 0
    for i in range(n):
        if not check(cmd, env):
            lost += 1
            print(f"  {name} run {i + 1}: output incomplete", flush=True)
    print(f"{name}: {n - lost} of {n} runs complete ({time.monotonic() - t0:.0f} s)", flush=True)
    return lost


def setup(tmp: Path) -> tuple[Path, list[str], list[str]]:
    """(the slow-log shim, the llama-perplexity --kl-divergence command, the llama-cli command),
    built in `tmp`; the demo's saved logits computed once."""
    shim, base = tmp / "slow_log.so", tmp / "base.kld"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(ROOT / "tests" / "slow_log.c"), "-ldl"], check=True)
    ppl = [str(llama_tool("llama-perplexity")), "-m", str(EMBEDDED), "-f", str(TEXT), "-c", "128",
           "--chunks", "8", "-t", "1", "--kl-divergence-base", str(base)]
    subprocess.run(ppl, capture_output=True, check=True)
    cli = [str(llama_tool("llama-cli")), "-m", str(EMBEDDED), "-p", "What is a list?", "-n", str(N_CLI),
           "--temp", "0", "--ignore-eos", "-st", "--no-warmup", "-c", "256", "-t", "1", "-v"]
    return shim, ppl + ["--kl-divergence"], cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100, help="llama-perplexity runs per load (default 100)")
    ap.add_argument("--cli-runs", type=int, default=20, help="llama-cli runs per load (default 20)")
    ap.add_argument("--loads", nargs="*", default=["busy", "slow-log"], choices=["busy", "slow-log"])
    args = ap.parse_args()

    lost = 0
    with tempfile.TemporaryDirectory() as tmp:
        shim, ppl, cli = setup(Path(tmp))
        for name in args.loads:
            print(f"load {name}: the tools on core {CORE}", flush=True)
            with load(name, shim) as env:
                lost += run("  llama-perplexity --kl-divergence", args.runs, perplexity_complete, ppl, env)
                lost += run("  llama-cli -v", args.cli_runs, cli_complete, cli, env)
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
