#!/usr/bin/env python3
"""MeKi vs its dense twin in the patched llama.cpp: speed, RAM and storage reads (a benchmark).

    scripts/bench [--rounds N] [--write-docs]
    scripts/bench --pair 1.7b [--rounds N]     # one pair's warm ratios only (a graph change's check)
    scripts/bench --files A.gguf B.gguf        # two files (two tables of one model), warm, interleaved

1. Writes synthetic random-weight twins at the paper's shapes straight as GGUF (meki_gguf/synth.py,
   cached in build/bench/): MeKi-0.6B/1.7B and their dense twins (the same backbone without the
   memory branch and table, as stock `qwen3` files; both with QK-norm), and a dense 4B; each with
   a q8_0 and a q4_0 backbone, the MeKi table in q8_0.
2. Speed, in one interleaved run on one build: llama-bench pp512 and tg128 of every model, one
   repetition per call, the models of a pair back to back (order alternating between rounds), in
   two modes: `warm` (the whole file read into the page cache first) and `cold` (the file evicted
   from the page cache with posix_fadvise(DONTNEED) before each call; llama-bench's warm-up then
   brings the backbone back, so what stays cold is the table: every random token's row is read
   from storage). Ratios MeKi / dense twin per round, then their median; MeKi-1.7B / dense-4B.
3. Memory and reads (one process per model, llama-cpp-python on the same libraries): file
   evicted, model loaded, a 16-token prompt and 128 decode steps on new random tokens; RSS after
   them, the table's resident pages (mincore) against the distinct tokens seen, and the bytes the
   process read from storage (/proc/self/io) per new token.
Results go to build/bench/results.json, the plot to docs/bench-ratios.png, the tables to stdout;
--write-docs also replaces the generated part of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meki_gguf.runtime import evict, llama_tool, read_header, resident_pages  # noqa: E402
from meki_gguf.synth import SHAPES, meki_weight_bytes, write_model  # noqa: E402

OUT = ROOT / "build" / "bench"
VOCAB = ROOT / "build" / "src" / "models" / "ggml-vocab-qwen2.gguf"
DOC = ROOT / "docs" / "BENCHMARKS.md"
PLOT = ROOT / "docs" / "bench-ratios.png"
BACKBONES = ("q8_0", "q4_0")
PAIRS = (("meki-0.6b", "dense-0.6b"), ("meki-1.7b", "dense-1.7b"))
PAGE = os.sysconf("SC_PAGESIZE")
TARGETS = {"tg_warm": 0.98, "tg_cold": 0.95, "pp_warm": 0.97, "tg_1.7b_vs_4b": 2.2, "pages_per_token": 3}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- models --------------------------------------------------------------------------------------

def model_path(name: str, backbone: str) -> Path:
    return OUT / f"{name}-{backbone}.gguf"


def make_models(regenerate: bool, backbones: tuple[str, ...] = BACKBONES,
                names: tuple[str, ...] = ("meki-0.6b", "dense-0.6b", "meki-1.7b", "dense-1.7b", "dense-4b")) -> None:
    kv = None
    for bt in backbones:
        for name in names:
            p = model_path(name, bt)
            if p.exists() and not regenerate:
                continue
            if kv is None:
                from meki_gguf.tokenizer import tokenizer_kv
                kv = tokenizer_kv(VOCAB, 151680)       # Qwen's vocab onto the paper's 151680 rows
            shape = SHAPES.get(name) or SHAPES[name.replace("dense", "meki")].dense()
            t = time.time()
            write_model(shape, p, bt, "q8_0", tokenizer_kv=kv)
            log(f"wrote {p.name} ({p.stat().st_size / 2**30:.2f} GiB) in {time.time() - t:.0f} s")


# --- page cache ----------------------------------------------------------------------------------

def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


# --- speed ---------------------------------------------------------------------------------------

def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat: busy is user, nice,
    system, irq and softirq (not idle or iowait); steal is time the hypervisor gave to others."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / hz, f[7] / hz


def llama_bench(path: Path, threads: int, pp: int, tg: int, warmup: bool = True, args: list[str] = (),
                env: dict | None = None) -> dict:
    """One llama-bench call, one repetition: {'pp'|'tg': t/s (wall clock), 'cpu': CPU seconds of
    the whole process (load, warm-up and run), 'wall': its seconds, 'others': CPU seconds the rest
    of the machine used meanwhile, 'steal': ..., 'build': ...}. 'others' is what says whether the
    machine was quiet: with 2 threads on 2 cores any other work lands on a core ggml spins on."""
    cmd = [str(llama_tool("llama-bench")), "-m", str(path), "-p", str(pp), "-n", str(tg), "-r", "1",
           "-t", str(threads), "-o", "json", *args] + ([] if warmup else ["--no-warmup"])
    before, (busy0, steal0), t0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu(), time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    after, (busy1, steal1), t1 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu(), time.monotonic()
    if p.returncode != 0:
        raise SystemExit(f"llama-bench failed on {path.name}:\n{p.stderr[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    res = {"cpu": cpu, "wall": t1 - t0, "others": max(0.0, busy1 - busy0 - cpu), "steal": steal1 - steal0}
    for t in json.loads(p.stdout):
        res["pp" if t["n_prompt"] else "tg"] = float(t["avg_ts"])
        res["build"] = f"{t['build_commit']} ({t['build_number']})"
    return res


def measure(path: Path, threads: int, mode: str) -> dict:
    """Wall-clock t/s from llama-bench, and CPU seconds per token: a call's CPU time less that of
    a baseline call (load and one token), per token run (warm-up included). CPU time is what the
    model costs whatever else the cores are doing; wall time is what a user waits."""
    base = llama_bench(path, threads, 0, 1, warmup=False)
    tg = llama_bench(path, threads, 0, 128)                          # warm-up 1 + 128 tokens
    res = {"tg": tg["tg"], "tg_cpu": (tg["cpu"] - base["cpu"]) / 128, "build": tg["build"]}
    calls = [base, tg]
    if mode == "warm":
        pp = llama_bench(path, threads, 512, 0)                      # warm-up 512 + 512 tokens
        res.update(pp=pp["pp"], pp_cpu=(pp["cpu"] - base["cpu"]) / 1023)
        calls.append(pp)
    res.update({k: sum(c[k] for c in calls) for k in ("wall", "others", "steal")})
    return res


def speed(rounds: int, threads: int) -> list[dict]:
    """Interleaved runs; one row per (round, mode, backbone, model)."""
    rows = []
    for r in range(rounds):
        for mode in ("warm", "cold"):
            for bt in BACKBONES:
                pairs = [p if r % 2 == 0 else p[::-1] for p in PAIRS]
                order = [m for p in pairs for m in p] + (["dense-4b"] if mode == "warm" else [])
                for name in order:
                    path = model_path(name, bt)
                    (warm if mode == "warm" else evict)(path)
                    res = measure(path, threads, mode)
                    rows.append({"round": r, "mode": mode, "backbone": bt, "model": name, **res})
                    log(f"round {r} {mode:4} {bt} {name:10} pp512 {res.get('pp', 0):7.2f} t/s "
                        f"({1e3 * res.get('pp_cpu', 0):6.2f} ms CPU/token)  tg128 {res['tg']:6.2f} t/s "
                        f"({1e3 * res['tg_cpu']:6.1f} ms CPU/token)")
    return rows


def pair_ratio(size: str, rounds: int, threads: int) -> None:
    """--pair: one pair, warm, both backbones, interleaved (the order alternating between rounds):
    MeKi/dense per round and their median, for a graph change's before/after without the whole run."""
    ratio_run({bt: (model_path(f"meki-{size}", bt), model_path(f"dense-{size}", bt)) for bt in BACKBONES},
              rounds, threads, f"MeKi-{size} / dense-{size}")


def ratio_run(pairs: dict[str, tuple[Path, Path]], rounds: int, threads: int, what: str) -> None:
    """Each pair (a, b) warm and interleaved, the order alternating between rounds: a/b per round
    (t/s; CPU time inverted) and the median."""
    rows = {}
    for r in range(rounds):
        for label, pair in pairs.items():
            for path in (pair if r % 2 == 0 else pair[::-1]):
                warm(path)
                res = measure(path, threads, "warm")
                rows.setdefault((label, path), []).append(res)
                log(f"round {r} {label} {path.name:28} pp512 {res['pp']:7.2f} t/s  tg128 {res['tg']:6.2f} t/s  "
                    f"(others {res['others']:.1f} CPU s in {res['wall']:.0f} s)")
    print(f"{what}, warm, {threads} thread(s), {rounds} interleaved rounds, build {res['build']}:")
    for label, (a, b) in pairs.items():
        for key in ("tg", "pp", "tg_cpu", "pp_cpu"):
            rs = [(x[key] / y[key]) ** (-1 if key.endswith("_cpu") else 1) for x, y in zip(rows[label, a], rows[label, b])]
            print(f"  {label} {key:6} median {statistics.median(rs):.3f}  rounds {' '.join(f'{x:.3f}' for x in rs)}")


def ratios(rows: list[dict]) -> dict:
    """Speed ratios A / B per round (t/s ratio for wall clock, inverse CPU-time ratio for CPU),
    then their median over the rounds; mean t/s per model."""
    def get(r, mode, bt, name, key):
        return next(x[key] for x in rows if (x["round"], x["mode"], x["backbone"], x["model"]) == (r, mode, bt, name))

    def ratio(mode, bt, a, b, key):
        rs = [(get(r, mode, bt, a, key) / get(r, mode, bt, b, key)) ** (-1 if key.endswith("_cpu") else 1)
              for r in range(n)]
        return {"median": statistics.median(rs), "rounds": rs}

    n = 1 + max(x["round"] for x in rows)
    out = {"tps": {}, "ratio": {}}
    for x in rows:
        d = out["tps"].setdefault(f"{x['mode']}/{x['backbone']}/{x['model']}", {})
        for key in ("pp", "tg", "pp_cpu", "tg_cpu"):
            if key in x:
                d.setdefault(key, []).append(x[key])
    for mode in ("warm", "cold"):
        # cold: the baseline call re-reads the evicted backbone, so CPU time per token does not compare
        keys = ("pp", "tg", "pp_cpu", "tg_cpu") if mode == "warm" else ("tg",)
        for bt in BACKBONES:
            for meki, dense in PAIRS:
                for key in keys:
                    out["ratio"][f"{mode}/{bt}/{meki}/{key}"] = ratio(mode, bt, meki, dense, key)
            if mode == "warm":
                for key in keys:
                    out["ratio"][f"warm/{bt}/meki-1.7b_vs_dense-4b/{key}"] = ratio(mode, bt, "meki-1.7b", "dense-4b", key)
    return out


# --- memory and storage reads -------------------------------------------------------------------

def probe(path: Path, threads: int, n_gen: int = 128, n_prompt: int = 16, seed: int = 0) -> dict:
    """Run in a fresh process (--probe): file evicted, load, prompt, n_gen decode steps on new
    random tokens. RSS, the table's resident pages and storage reads per step."""
    import numpy as np
    from llama_cpp import Llama

    kv, tensors = read_header(path)
    table = tensors.get("meki_mem.weight")
    n_vocab = kv["tokenizer.ggml.tokens"]                  # the array's length
    evict(path)

    def table_pages() -> int:
        return resident_pages(path, table.offset, table.nbytes)[0] if table else 0

    llm = Llama(str(path), n_ctx=n_prompt + n_gen + 8, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    toks = np.random.default_rng(seed).permutation(n_vocab)[: n_prompt + n_gen].tolist()   # all distinct
    llm.eval(toks[:n_prompt])                                                # warms the backbone up
    steps = []
    read0, pages0 = _read_bytes(), table_pages()
    for i in range(n_gen):
        llm.eval([toks[n_prompt + i]])
        steps.append({"distinct_tokens": n_prompt + i + 1, "read_bytes": _read_bytes() - read0,
                      "table_pages": table_pages()})
    status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines() if ":" in ln)
    kib = {k: int(status[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    out = {"model": path.name, "rss_kib": kib, "steps": steps, "table_pages_before_gen": pages0,
           "table_pages_total": resident_pages(path, table.offset, table.nbytes)[1] if table else 0,
           "read_pages_per_token": (_read_bytes() - read0) / PAGE / n_gen,
           "table_pages_per_token": (table_pages() - pages0) / n_gen if table else 0.0,
           "row_bytes": table.nbytes // table.shape[1] if table else 0}
    return out


def _read_bytes() -> int:
    return int(next(ln.split()[1] for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("read_bytes")))


def probes(threads: int) -> list[dict]:
    out = []
    for bt in BACKBONES:
        for meki, dense in PAIRS:
            for name in (meki, dense):
                p = subprocess.run([sys.executable, __file__, "--probe", str(model_path(name, bt)), "-t", str(threads)],
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"probe failed on {name}-{bt}:\n{p.stderr[-2000:]}")
                d = json.loads(p.stdout.strip().splitlines()[-1])
                d.update(backbone=bt, name=name, weights=meki_weight_bytes(model_path(name, bt)))
                out.append(d)
                log(f"probe {name}-{bt}: RSS {d['rss_kib']['VmRSS'] / 1024:.0f} MiB, "
                    f"{d['read_pages_per_token']:.2f} pages read / token, "
                    f"{d['table_pages_per_token']:.2f} table pages / token")
    return out


# --- report --------------------------------------------------------------------------------------

def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(ln.split(":", 1) for ln in lscpu.splitlines() if ":" in ln)
    flags = info.get("Flags", "")
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return {"cpu": info.get("Model name", "?").strip(), "cores": os.cpu_count(),
            "isa": " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags.split()),
            "ram_gib": round(mem / 2**20, 1), "kernel": platform.release(),
            "disk": subprocess.run(["df", "-h", "--output=source,size", str(OUT)], capture_output=True,
                                   text=True).stdout.split("\n")[1].strip()}


def quiet(res: dict) -> str:
    """How much of the machine other work took while the speed runs ran, from the per-call counts
    of llama_bench (runs before they were kept say nothing)."""
    rows = [r for r in res["rows"] if "others" in r]
    if not rows:
        return "Other work shared the cores: wall-clock t/s (llama-bench's) swing with it."
    cores = res["machine"]["cores"]
    total = lambda k: 100 * sum(r[k] for r in rows) / (cores * sum(r["wall"] for r in rows))  # noqa: E731
    most = 100 * max(r["others"] / (cores * r["wall"]) for r in rows)
    return (f"While they ran, the rest of the machine used {total('others'):.1f}% of its CPU time (at most "
            f"{most:.1f}% during one model's calls) and the hypervisor took {total('steal'):.1f}% as steal.")


def report(res: dict) -> str:
    sp, pr, mc = res["speed"], res["probe"], res["machine"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    def med(key):
        return sp["ratio"].get(key, {}).get("median")

    L = [f"Machine: {mc['cpu']}, {mc['cores']} cores ({mc['isa']}), {mc['ram_gib']} GiB RAM, Linux "
         f"{mc['kernel']}, disk {' '.join(mc['disk'].split())}. llama.cpp build {res['build']}, "
         f"{res['threads']} thread(s) per run, "
         f"{res['rounds']} interleaved rounds; ratios are per round, then the median. {quiet(res)} CPU time per "
         f"token is the llama-bench process's user+sys, less a load-and-one-token baseline (warm runs only); "
         f"other work on the cores disturbs it much less than wall clock.\n",
         "| backbone | model | mode | pp512 t/s | tg128 t/s | pp ms CPU/token | tg ms CPU/token | "
         "pp MeKi/dense (wall, CPU) | tg MeKi/dense (wall, CPU) |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for bt in BACKBONES:
        for mode in ("warm", "cold"):
            for meki, dense in PAIRS:
                for name in (meki, dense):
                    t = sp["tps"][f"{mode}/{bt}/{name}"]
                    m = lambda k: statistics.mean(t[k]) if k in t else None  # noqa: E731
                    rp = (med(f"{mode}/{bt}/{name}/pp"), med(f"{mode}/{bt}/{name}/pp_cpu"))
                    rt = (med(f"{mode}/{bt}/{name}/tg"), med(f"{mode}/{bt}/{name}/tg_cpu"))
                    L.append(f"| {bt} | {name} | {mode} | {f(m('pp'), '.1f')} | {f(m('tg'), '.2f')} | "
                             f"{f(m('pp_cpu') and 1e3 * m('pp_cpu'), '.2f')} | "
                             f"{f(m('tg_cpu') and 1e3 * m('tg_cpu'), '.1f') if mode == 'warm' else ''} | "
                             f"{'' if rp[0] is None else f'{rp[0]:.3f}, {rp[1]:.3f}'} | "
                             f"{'' if rt[0] is None else f'{rt[0]:.3f}' + ('' if rt[1] is None else f', {rt[1]:.3f}')} |")
        t = sp["tps"][f"warm/{bt}/dense-4b"]
        k = f"warm/{bt}/meki-1.7b_vs_dense-4b/"
        L.append(f"| {bt} | dense-4b | warm | {statistics.mean(t['pp']):.1f} | {statistics.mean(t['tg']):.2f} | "
                 f"{1e3 * statistics.mean(t['pp_cpu']):.2f} | {1e3 * statistics.mean(t['tg_cpu']):.1f} | "
                 f"MeKi-1.7B/4B {med(k + 'pp'):.2f}x, {med(k + 'pp_cpu'):.2f}x | "
                 f"MeKi-1.7B/4B {med(k + 'tg'):.2f}x, {med(k + 'tg_cpu'):.2f}x |")
    L += ["", "| backbone | model | RSS after 128 tokens (anon + file) | RSS MeKi - dense | MeKi in-RAM weights "
          "(+ 32 MiB) | table row | pages read / new token | table pages / new token |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    by = {(d["backbone"], d["name"]): d for d in pr}
    for bt in BACKBONES:
        for meki, dense in PAIRS:
            for name in (meki, dense):
                a, b = by[(bt, name)], by[(bt, dense)]
                rss = a["rss_kib"]
                line = (f"| {bt} | {name} | {rss['VmRSS'] / 1024:.0f} MiB ({rss['RssAnon'] / 1024:.0f} + "
                        f"{rss['RssFile'] / 1024:.0f}) | ")
                if name == meki:
                    diff = (rss["VmRSS"] - b["rss_kib"]["VmRSS"]) / 1024
                    w = a["weights"]["branch"] / 2**20
                    line += (f"{diff:+.1f} MiB | {w:.1f} MiB ({w + 32:.1f}) | {a['row_bytes']} B | "
                             f"{a['read_pages_per_token']:.2f} | {a['table_pages_per_token']:.2f} |")
                else:
                    line += f" | | | {a['read_pages_per_token']:.2f} | |"
                L.append(line)
    return "\n".join(L)


def plot(res: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = res["speed"]["ratio"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3.2, 1]})

    def bar(ax, at, ratios, color, label=None, fmt=".3f", **text):
        """Bars at the medians, whiskers from the lowest to the highest round, the median above."""
        med = [r["median"] if r else 0.0 for r in ratios]
        err = [[m - min(r["rounds"]) if r else 0 for m, r in zip(med, ratios)],
               [max(r["rounds"]) - m if r else 0 for m, r in zip(med, ratios)]]
        ax.bar(at, med, 0.4, yerr=err, capsize=2, error_kw={"lw": 0.8}, label=label, color=color)
        for i, m, r in zip(at, med, ratios):
            if r:
                ax.text(i, max(r["rounds"]) * 1.004, format(m, fmt), ha="center", va="bottom", **text)
        return [v for r in ratios if r for v in r["rounds"]]

    labels, wall, cpu, targets = [], [], [], []
    for bt in BACKBONES:
        for meki, _ in PAIRS:
            for mode, t, tgt in (("warm", "pp", 0.97), ("warm", "tg", 0.98), ("cold", "tg", 0.95)):
                key = f"{mode}/{bt}/{meki}/{t}"
                labels.append(f"{meki[5:]} {bt}\n{t} {mode}")
                wall.append(sp[key])
                cpu.append(sp.get(key + "_cpu"))
                targets.append(tgt)
    x = range(len(labels))
    small = {"fontsize": 6, "rotation": 90}
    vals = (bar(ax, [i - 0.2 for i in x], wall, "tab:blue", "wall clock (llama-bench t/s)", **small)
            + bar(ax, [i + 0.2 for i in x], cpu, "tab:green", "CPU time per token (warm)", **small))
    for i, tgt in enumerate(targets):
        ax.plot([i - 0.45, i + 0.45], [tgt, tgt], color="k", lw=1.2)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylim(min(vals + [0.9]) - 0.03, max(vals + [1.05]) + 0.07)
    ax.set_ylabel("speed ratio MeKi / dense twin")
    ax.set_title(f"MeKi vs its dense twin, {res['threads']} thread(s): median of {res['rounds']} rounds, "
                 "whiskers lowest to highest (black: target)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    bar(ax2, [-0.2, 0.8], [sp[f"warm/{bt}/meki-1.7b_vs_dense-4b/tg"] for bt in BACKBONES], "tab:blue",
        fmt=".2f", fontsize=8)
    bar(ax2, [0.2, 1.2], [sp[f"warm/{bt}/meki-1.7b_vs_dense-4b/tg_cpu"] for bt in BACKBONES], "tab:green",
        fmt=".2f", fontsize=8)
    ax2.axhline(2.2, color="k", lw=1.2)
    ax2.set_xticks(range(2), [f"tg128 {bt}" for bt in BACKBONES])
    ax2.set_title("MeKi-1.7B / dense-4B decode (target 2.2x)", fontsize=10)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def write_docs(text: str) -> None:
    begin, end = "<!-- bench:begin (generated by scripts/bench --write-docs) -->", "<!-- bench:end -->"
    doc = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    i, j = doc.index(begin) + len(begin), doc.index(end)
    DOC.write_text(doc[:i] + "\n" + text + "\n" + doc[j:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("-t", "--threads", type=int, default=1,
                    help="threads per run (default 1: with other work on the cores, ggml's spinning "
                         "barriers make multi-thread timings swing by 5x; use the core count on a quiet machine)")
    ap.add_argument("--regenerate", action="store_true", help="rewrite the cached synthetic models")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md and its plot")
    ap.add_argument("--skip-speed", action="store_true", help="reuse the speed results of the last run")
    ap.add_argument("--pair", choices=["0.6b", "1.7b"],
                    help="only this pair's warm speed ratios, both backbones (a graph change's check)")
    ap.add_argument("--files", nargs=2, type=Path, metavar=("A", "B"),
                    help="only A against B (two tables of one model, say), warm, interleaved: the A/B ratios")
    ap.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.threads)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if args.pair:
        make_models(args.regenerate, names=(f"meki-{args.pair}", f"dense-{args.pair}"))
        return pair_ratio(args.pair, args.rounds, args.threads)
    if args.files:
        return ratio_run({"A/B": tuple(args.files)}, args.rounds, args.threads, f"{args.files[0].name} / {args.files[1].name}")
    make_models(args.regenerate)
    res_file = OUT / "results.json"
    if args.skip_speed:
        res = json.loads(res_file.read_text())
        res["speed"] = ratios(res["rows"])
    else:
        rows = speed(args.rounds, args.threads)
        res = {"rows": rows, "speed": ratios(rows), "rounds": args.rounds, "threads": args.threads,
               "build": rows[0]["build"]}
    res["probe"] = probes(args.threads)
    res["machine"] = machine()
    res_file.write_text(json.dumps(res, indent=1))
    text = report(res)
    print(text)
    plot(res)
    if args.write_docs:
        write_docs(text)
    log(f"results in {res_file.relative_to(ROOT)}, plot in {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
