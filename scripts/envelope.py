#!/usr/bin/env python3
"""MeKi inside a phone's memory: the synthetic twins of scripts/bench (MeKi-0.6B/1.7B, dense-0.6B/
1.7B/4B) run by llama-bench in a memory-capped control group, storage reads throttled to a phone's.

    scripts/envelope [--profile ufs31|emmc51|none] [--backbone q4_0|q8_0] [--rounds 3] [--caps MiB,...]
                     [--stages sweep,bisect,targets,modes] [--append] [--write-docs]

The cap is a cgroup memory limit (v1 memory.limit_in_bytes, v2 memory.max), which bounds the
process's anonymous memory *and* the page cache it brings in (the mapped model); storage reads are
throttled on the device holding the models (v1 blkio.throttle.read_{iops,bps}_device, v2 io.max).
One control group per run, removed after it, Ctrl-C and SIGTERM included.

Per model and cap (rounds interleaved, the order of the models alternating):
  ttft   cold page cache, the process's wall time to load and evaluate a 16-token prompt
         (llama-bench -p 16 -n 0 --no-warmup): the time to the first token's logits;
  tg     decode t/s, llama-bench tg128 (after a tg16 in the same process, and its own warm-up),
         and the storage bytes read and major faults during it, per generated token;
  pp     prompt t/s, llama-bench pp512;
  peak RSS of the process and peak cgroup memory (anonymous + page cache), and the outcome:
  ran, thrashed (decode < half its uncapped speed, or the call ran past its time limit) or killed
  (the kernel's OOM killer, at the cap).
Stages (--stages; those not run keep their saved results):
  sweep    every model (--models) at every cap (--caps), --rounds interleaved rounds;
  bisect   the smallest cap (to 32 MiB) at which each --bisect model decodes at >= 0.9x its speed
           under a cap of its file size + 512 MiB (measured first);
  targets  both 1.7B models at MeKi-1.7B's cap, --target-rounds interleaved rounds;
  modes    MeKi-1.7B at that cap under each of llama.cpp's load modes (-lm mmap|none|dio|mlock).
--append adds the sweep's and the targets' rounds to the saved ones.
Results: build/bench/envelope-BACKBONE-PROFILE.json; --write-docs: the envelope section of
docs/BENCHMARKS.md (every backbone and profile measured) and docs/envelope.png.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (the synthetic models, llama-bench, machine())
from meki_gguf.runtime import evict, llama_tool  # noqa: E402

MiB = 2**20
PLOT = ROOT / "docs" / "envelope.png"
MODELS = ("meki-1.7b", "dense-1.7b", "dense-4b", "meki-0.6b", "dense-0.6b")
# Storage profiles: (read IOPS, read bytes/s). Samsung's published figures for its embedded phone
# storage (press release of 2020-03-17, announcing the 512 GB eUFS 3.1, with a table of its earlier
# parts): eUFS 3.1 2,100 MB/s sequential read and 100,000 random-read IOPS; eMMC 5.1 (budget
# phones) 250 MB/s and 11,000 IOPS. docs/BENCHMARKS.md cites the pages.
PROFILES = {"ufs31": (100_000, 2_100_000_000), "emmc51": (11_000, 250_000_000), "none": None}
TG_LIMIT_S = 90           # a call past this is thrashing (uncapped, the slowest takes ~25 s)


def log(msg: str) -> None:
    print(f"[envelope] {msg}", file=sys.stderr, flush=True)


# --- control groups ----------------------------------------------------------------------------

CG = Path("/sys/fs/cgroup")


def cgroup_version() -> int:
    """2 for the unified hierarchy, 1 for v1 with the memory controller; SystemExit where neither
    can be written (not root, or a container without a writable cgroup file system)."""
    if (CG / "cgroup.controllers").exists():
        version, probe = 2, CG
    elif (CG / "memory" / "memory.limit_in_bytes").exists():
        version, probe = 1, CG / "memory"
    else:
        sys.exit("error: no cgroup memory controller at /sys/fs/cgroup: the envelope needs cgroups (v1 or v2)")
    if not os.access(probe, os.W_OK):
        sys.exit(f"error: {probe} is not writable: the envelope creates control groups, which needs root "
                 f"(and, in a container, a writable cgroup file system)")
    return version


def block_device(path: Path) -> str:
    """MAJ:MIN of the whole disk holding path (throttles apply to disks, not partitions)."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not dev.exists():
        sys.exit(f"error: {path} is not on a block device (tmpfs, overlay?): storage cannot be throttled")
    if (dev / "partition").exists():
        dev = dev.resolve().parent
    return (dev / "dev").read_text().strip()


class Cgroup:
    """A memory-capped, read-throttled control group for one run; removed on exit."""
    PREFIX = "meki-envelope"

    def __init__(self, version: int, cap: int | None, throttle: tuple[int, int] | None, device: str):
        self.v, self.name = version, f"{self.PREFIX}-{os.getpid()}-{time.monotonic_ns()}"
        # v1: blkio joined throttled or not, for its count of the bytes read
        self.dirs = [CG / "memory" / self.name, CG / "blkio" / self.name] if version == 1 else [CG / self.name]
        self.cap, self.throttle, self.device = cap, throttle, device

    def __enter__(self) -> "Cgroup":
        for d in self.dirs:
            d.mkdir()
        if self.v == 1:
            mem = self.dirs[0]
            if self.cap:
                (mem / "memory.limit_in_bytes").write_text(str(self.cap))
                if (mem / "memory.memsw.limit_in_bytes").exists():       # no swapping out of the cap
                    (mem / "memory.memsw.limit_in_bytes").write_text(str(self.cap))
            if self.throttle:
                iops, bps = self.throttle
                (self.dirs[1] / "blkio.throttle.read_iops_device").write_text(f"{self.device} {iops}")
                (self.dirs[1] / "blkio.throttle.read_bps_device").write_text(f"{self.device} {bps}")
        else:
            (CG / "cgroup.subtree_control").write_text("+memory +io")
            if self.cap:
                (self.dirs[0] / "memory.max").write_text(str(self.cap))
                (self.dirs[0] / "memory.swap.max").write_text("0")
            if self.throttle:
                (self.dirs[0] / "io.max").write_text(f"{self.device} riops={self.throttle[0]} rbps={self.throttle[1]}")
        return self

    def join(self) -> None:
        """In the child, before exec."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict:
        mem = self.dirs[0]
        stat = dict(ln.split() for ln in (mem / "memory.stat").read_text().splitlines())
        if self.v == 1:
            peak = int((mem / "memory.max_usage_in_bytes").read_text())
            oom = dict(ln.split() for ln in (mem / "memory.oom_control").read_text().splitlines())
            read = 0
            for ln in (self.dirs[1] / "blkio.throttle.io_service_bytes").read_text().splitlines():
                f = ln.split()
                if len(f) == 3 and f[0] == self.device and f[1] == "Read":
                    read = int(f[2])
            return {"peak": peak, "majfault": int(stat.get("total_pgmajfault", stat.get("pgmajfault", 0))),
                    "read": read, "oom_kills": int(oom.get("oom_kill", 0)),
                    "refault": int(stat.get("total_workingset_refault_file", 0))}
        events = dict(ln.split() for ln in (mem / "memory.events").read_text().splitlines())
        io = {}
        for ln in (mem / "io.stat").read_text().splitlines():
            f = ln.split()
            if f and f[0] == self.device:
                io = dict(kv.split("=") for kv in f[1:])
        peak_file = mem / "memory.peak"
        return {"peak": int(peak_file.read_text()) if peak_file.exists() else 0,
                "majfault": int(stat.get("pgmajfault", 0)), "read": int(io.get("rbytes", 0)),
                "oom_kills": int(events.get("oom_kill", 0)), "refault": int(stat.get("workingset_refault_file", 0))}

    def __exit__(self, *exc) -> None:
        for d in self.dirs:
            if not d.exists():
                continue
            for _ in range(50):                  # the run's processes, if any are left
                pids = (d / "cgroup.procs").read_text().split()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            d.rmdir()


def remove_stale_cgroups() -> None:
    """Control groups a killed run (SIGKILL) left behind."""
    for parent in (CG / "memory", CG / "blkio", CG):
        for d in parent.glob(f"{Cgroup.PREFIX}-*"):
            try:
                alive = Path(f"/proc/{d.name.split('-')[2]}").exists()
            except IndexError:
                alive = False
            if not alive and not (d / "cgroup.procs").read_text().split():
                d.rmdir()


# --- runs ----------------------------------------------------------------------------------------

def run_capped(cmd: list[str], cg: Cgroup, timeout: float) -> dict:
    """cmd in the control group: wall seconds, its own peak RSS (wait4), exit status, output, and
    the control group's counters when its first output line appeared ("mark": llama-bench -o jsonl
    prints each test as it ends, so the reads of the tests after the first can be told apart)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, preexec_fn=cg.join)
        timed_out, mark = False, None
        while True:
            if mark is None and os.fstat(out.fileno()).st_size:
                mark = cg.stats()
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t > timeout:
                p.kill()
                timed_out = True
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall": wall, "rc": p.returncode, "timed_out": timed_out, "out": out.read(),
                "err": err.read()[-2000:], "maxrss": ru.ru_maxrss * 1024, "stime": ru.ru_stime, "mark": mark}


def bench_cmd(path: Path, threads: int, pp: int, tg: int | str, warmup: bool = True,
              load_mode: str | None = None) -> list[str]:
    return ([str(llama_tool("llama-bench")), "-m", str(path), "-p", str(pp), "-n", str(tg), "-r", "1",
             "-t", str(threads), "-o", "jsonl"] + ([] if warmup else ["--no-warmup"])
            + (["-lm", load_mode] if load_mode else []))


def tps(res: dict, test: int = -1) -> float | None:
    """t/s of a call's test (the last by default)."""
    if res["rc"] != 0 or res["timed_out"]:
        return None
    return float(json.loads(res["out"].splitlines()[test])["avg_ts"])


def measure(path: Path, cap: int | None, profile, threads: int, version: int, device: str,
            what=("ttft", "tg", "pp"), uncapped_tg: float | None = None, load_mode: str | None = None) -> dict:
    """One model under one cap: see the module's docstring. Thrashing (decode under half of
    uncapped_tg) skips pp512."""
    row: dict = {"cap_mib": cap // MiB if cap else None, "ttft_s": None, "tg": None, "pp": None,
                 "read_per_token": None, "majfault_per_token": None}
    with Cgroup(version, cap, profile, device) as cg:
        evict(path)
        runs = []

        def call(pp, tg, warmup=True):
            """A llama-bench call; None once one has run past the limit (thrashing: skip the rest)."""
            if runs and (runs[-1]["timed_out"] or runs[-1]["rc"] != 0):
                return None
            runs.append(run_capped(bench_cmd(path, threads, pp, tg, warmup, load_mode), cg, TG_LIMIT_S))
            return runs[-1]

        if "ttft" in what and (r := call(16, 0, warmup=False)):
            row["ttft_s"] = r["wall"] if tps(r) else None
        # one process: tg16 (with the warm-up, it brings the backbone in), then tg128, whose reads
        # and faults (its 1-token warm-up included) are those after tg16's line
        tg = call(0, "16,128")
        end = cg.stats()
        if tg and tps(tg) and tg["mark"]:
            row["tg"] = tps(tg)
            row["read_per_token"] = (end["read"] - tg["mark"]["read"]) / 129
            row["majfault_per_token"] = (end["majfault"] - tg["mark"]["majfault"]) / 129
            # file pages read again after the cap evicted them: the backbone crowded out by table pages
            row["refault_per_token"] = (end["refault"] - tg["mark"]["refault"]) / 129
            row["peak_rss_mib"] = tg["maxrss"] / MiB
            # the kernel's CPU time in the process (loading included): reclaim at the cap shows here
            row["sys_s"] = tg["stime"]
        last = runs[-1]
        thrashed = last["timed_out"] or bool(row["tg"] and uncapped_tg and row["tg"] < 0.5 * uncapped_tg)
        if "pp" in what and row["tg"] and not thrashed and (r := call(512, 0)):
            row["pp"] = tps(r)
        st = cg.stats()
        row["peak_cgroup_mib"] = st["peak"] / MiB
        row["outcome"] = ("killed" if st["oom_kills"] or last["rc"] == -signal.SIGKILL and not last["timed_out"]
                          else "thrashed" if thrashed else "ran" if row["tg"] else f"failed: {last['err'][-300:]}")
    return row


def in_ram_bytes(path: Path) -> int:
    """What the model holds in RAM: its tensors less MeKi's table (which stays on storage)."""
    w = bench.meki_weight_bytes(path)
    return w["total"] - w["table"]


def sweep(models: list[str], backbone: str, base: int, caps_extra: list[int | None], rounds: int, threads: int,
          profile, version: int, device: str, first_round: int = 0) -> list[dict]:
    """Every model at every cap (the same caps for all: `base`, MeKi-1.7B's in-RAM size, + extra MiB)."""
    # uncapped first (each model's uncapped speed is what "thrashed" is judged against), then down
    caps = ([None] if None in caps_extra else []) + sorted((base + e * MiB for e in caps_extra if e is not None),
                                                           reverse=True)
    rows, uncapped = [], {}
    for r in range(first_round, first_round + rounds):
        order = models if r % 2 == 0 else models[::-1]
        for cap in caps:
            for name in order:
                path = bench.model_path(name, backbone)
                row = measure(path, cap, profile, threads, version, device, uncapped_tg=uncapped.get(name))
                if cap is None and row["tg"] and name not in uncapped:
                    uncapped[name] = row["tg"]
                row.update(round=r, model=name, backbone=backbone)
                rows.append(row)
                log(f"round {r} cap {row['cap_mib'] or 'none':>5} MiB {name:10} {row['outcome']:8} "
                    f"tg {row['tg'] or 0:6.2f} t/s  pp {row['pp'] or 0:7.2f} t/s  ttft {row['ttft_s'] or 0:5.2f} s  "
                    f"peak {row['peak_cgroup_mib']:6.0f} MiB  {(row['read_per_token'] or 0) / 4096:6.2f} pages read/token")
    return rows


def bisect(name: str, backbone: str, threads: int, profile, version: int, device: str,
           step: int = 32 * MiB) -> dict:
    """The smallest cap (to `step`) at which `name` decodes at >= 0.9x its speed under a cap of its
    file size + 512 MiB (measured first, minutes apart from the probes rather than hours, so that
    the machine's drift does not pass for the cap's effect)."""
    path = bench.model_path(name, backbone)
    # lo fails (the weights alone fill it; the KV cache and buffers need more)
    lo, hi = in_ram_bytes(path), path.stat().st_size + 512 * MiB
    tried = []

    def probe(cap):
        row = measure(path, cap, profile, threads, version, device, what=("tg",))
        tried.append(row)
        log(f"bisect {name}: cap {cap // MiB} MiB -> {row['outcome']} {row['tg'] or 0:.2f} t/s")
        return row["tg"]

    ref = probe(hi)
    if not ref:
        return {"model": name, "cap_mib": None, "ref_tg": None, "tried": tried}
    while hi - lo > step:
        mid = (lo + hi) // 2 // MiB * MiB
        tg = probe(mid)
        if tg is not None and 0.5 * ref <= tg < 0.9 * ref:
            # short of 0.9x but far from thrashing: a run's noise (+-10% here) or the cap? once more
            tg = max(tg, probe(mid) or 0)
        if tg is not None and tg >= 0.9 * ref:
            hi = mid
        else:
            lo = mid
    return {"model": name, "cap_mib": hi // MiB, "ref_tg": ref, "tried": tried}


# --- report --------------------------------------------------------------------------------------

def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def spread(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return f" ({min(vals):.1f}-{max(vals):.1f})" if len(vals) > 1 else ""


def results_path(backbone: str, profile: str) -> Path:
    return bench.OUT / f"envelope-{backbone}-{profile}.json"


def ratio_per_round(mk: list[dict], dn: list[dict], key: str) -> str:
    """MeKi / dense per round (the two run back to back), their median and range, as scripts/bench."""
    by_round = {r["round"]: r[key] for r in dn if r.get(key) and r["outcome"] == "ran"}
    rs = [r[key] / by_round[r["round"]] for r in mk if r.get(key) and r["outcome"] == "ran" and r["round"] in by_round]
    if not rs:
        return "-"
    return f"{statistics.median(rs):.3f}" + (f" ({min(rs):.3f}-{max(rs):.3f})" if len(rs) > 1 else "")


def targets(res: dict) -> dict:
    at = res["at_meki_cap"]
    mk = [r for r in at if r["model"] == "meki-1.7b"]
    dn = [r for r in at if r["model"] == "dense-1.7b"]
    pages = med(mk, "read_per_token")
    refaults = {m: med(rs, "refault_per_token") for m, rs in (("meki", mk), ("dense", dn))}
    return {"cap_mib": at[0]["cap_mib"], "rounds": len(mk), "tg": ratio_per_round(mk, dn, "tg"),
            "ttft": ratio_per_round(mk, dn, "ttft_s"), "pages": "-" if pages is None else f"{pages / 4096:.2f}",
            "refaults": "; refaults per generated token (pages the cap evicted, read again): MeKi "
                        f"{refaults['meki']:.2f}, dense {refaults['dense']:.2f}" if None not in refaults.values() else ""}


def throttle(t) -> str:
    """A profile's limits as the docs' table of profiles gives them."""
    return f"({t[0]:,} IOPS, {t[1] / 1e6:,.0f} MB/s)" if t else "(unthrottled)"


def report(res: dict) -> str:
    rows, models = res["rows"], list(res["file_mib"])
    caps = sorted({r["cap_mib"] for r in rows}, key=lambda c: c or 1 << 40)
    base = res["cap_base_mib"]
    lines = [f"Machine: {res['machine']['cpu']}, {res['threads']} threads, {res['machine']['ram_gib']} GiB, "
             f"kernel {res['machine']['kernel']}; cgroup v{res['cgroup']}; storage profile `{res['profile']}` "
             f"{throttle(res['throttle'])}; {res['backbone']} backbones, q8_0 table; "
             f"{max(r['round'] for r in rows) + 1} interleaved round(s), medians (min-max).", "",
             "| model | file MiB | in RAM MiB |", "|---|---:|---:|"]
    lines += [f"| {m} | {res['file_mib'][m]:.0f} | {res['in_ram_mib'][m]:.0f} |" for m in models]
    lines += ["", "| cap (MiB) | model | outcome | tg128 t/s | pp512 t/s | cold TTFT s | peak RSS MiB | "
              "peak cgroup MiB | pages read / token | major faults / token |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cap in caps:
        label = "none" if cap is None else f"{cap} (+{cap - base:.0f})"
        for m in models:
            rs = [r for r in rows if r["model"] == m and r["cap_mib"] == cap]
            if not rs:
                continue
            outcomes = "/".join(sorted({r["outcome"][:8] for r in rs}))

            def f(key, fmt):
                v = med(rs, key)
                return "-" if v is None else format(v, fmt) + (spread(rs, key) if key in ("tg", "pp") else "")
            lines.append(f"| {label} | {m} | {outcomes} | {f('tg', '.2f')} | {f('pp', '.1f')} | {f('ttft_s', '.2f')} | "
                         f"{f('peak_rss_mib', '.0f')} | {f('peak_cgroup_mib', '.0f')} | "
                         f"{'-' if med(rs, 'read_per_token') is None else format(med(rs, 'read_per_token') / 4096, '.2f')} | "
                         f"{f('majfault_per_token', '.2f')} |")
    if res.get("at_meki_cap"):
        t = targets(res)
        lines += ["", f"Both 1.7B models at MeKi-1.7B's full-speed cap ({t['cap_mib']} MiB), {t['rounds']} interleaved "
                  f"round(s): MeKi / dense decode {t['tg']} (target >= 0.95), cold TTFT {t['ttft']} (target <= 1.1); "
                  f"MeKi reads {t['pages']} storage pages per generated token (target <= 3){t['refaults']}."]
    if res.get("load_modes"):
        lines += ["", "MeKi-1.7B under the same cap with each of llama.cpp's load modes (`-lm`):", "",
                  "| load mode | outcome | cold TTFT s | tg128 t/s | peak cgroup MiB | pages read / token |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in res["load_modes"]:
            ttft = "-" if r["ttft_s"] is None else f"{r['ttft_s']:.2f}"
            lines.append(f"| {r['load_mode']} | {r['outcome'][:40]} | {ttft} | "
                         f"{r['tg'] or 0:.2f} | {r['peak_cgroup_mib']:.0f} | {(r['read_per_token'] or 0) / 4096:.2f} |")
    if res.get("bisect"):
        lines += ["", "RAM needed for full speed (the smallest cap, to 32 MiB, at which tg128 >= 0.9x the "
                  "model's tg128 under a cap of its file size + 512 MiB, measured just before):", "",
                  "| model | cap MiB | over its in-RAM size |", "|---|---:|---:|"]
        for b in res["bisect"]:
            c, ram = b["cap_mib"], res["in_ram_mib"][b["model"]]
            lines.append(f"| {b['model']} | {c or 'not reached'} | {f'+{c - ram:.0f}' if c else ''} |")
        caps = {b["model"]: b["cap_mib"] for b in res["bisect"]}
        for size in ("1.7b", "0.6b"):
            mk, dn = f"meki-{size}", f"dense-{size}"
            if caps.get(mk) and caps.get(dn):
                lines += ["", f"MeKi-{size.upper()} needs {caps[mk] - caps[dn]:+d} MiB over dense-{size.upper()} for "
                          f"full speed{' (target <= +64)' if size == '1.7b' else ''}, with a file "
                          f"{res['file_mib'][mk] / res['file_mib'][dn]:.2f}x as large."]
    return "\n".join(lines)


SETS = [(b, p) for b in reversed(bench.BACKBONES) for p in PROFILES]     # the order of the report: q4_0 first


def saved() -> list[dict]:
    return [json.loads(results_path(b, p).read_text()) for b, p in SETS if results_path(b, p).exists()]


def summary(sets: list[dict]) -> str:
    """The headline figures of every backbone and storage profile measured, one row each."""
    lines = ["| backbone | storage | RAM for full speed: MeKi-1.7B | dense-1.7B | MeKi - dense (target <= +64) | "
             "dense-4B | at MeKi's cap: decode MeKi / dense (target >= 0.95) | pages read / token (<= 3) | "
             "cold TTFT MeKi / dense (<= 1.1) | rounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in sets:
        caps = {b["model"]: b["cap_mib"] for b in res.get("bisect", [])}
        mk, dn, d4 = (caps.get(m) for m in ("meki-1.7b", "dense-1.7b", "dense-4b"))
        t = targets(res) if res.get("at_meki_cap") else {"tg": "-", "pages": "-", "ttft": "-", "rounds": 0}
        lines.append(f"| {res['backbone']} | `{res['profile']}` | {mk or '-'} | {dn or '-'} | "
                     f"{f'{mk - dn:+d}' if mk and dn else '-'} | {d4 or '-'} | {t['tg']} | {t['pages']} | "
                     f"{t['ttft']} | {t['rounds']} |")
    return "\n".join(lines)


def report_all(sets: list[dict]) -> str:
    parts = ["Summary (MiB; decode and TTFT: MeKi / dense per interleaved round, median (min-max)):", "",
             summary(sets)]
    for res in sets:
        parts += ["", f"### {res['backbone']} backbones, storage `{res['profile']}`", "", report(res)]
    return "\n".join(parts)


def plot(sets: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [r for r in sets if r["profile"] == "ufs31" and r.get("rows")]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, res in zip(axes[0], sets):
        uncapped_x = max(r["cap_mib"] or 0 for r in res["rows"]) + 256
        for m in res["file_mib"]:
            pts = {}
            for r in res["rows"]:
                if r["model"] == m:
                    pts.setdefault(r["cap_mib"] or uncapped_x, []).append(r["tg"] or 0.0)
            xs = sorted(pts)
            ax.plot(xs, [statistics.median(pts[x]) for x in xs], marker="o", label=m)
        ax.set_xlabel("RAM cap, MiB (rightmost: uncapped)")
        ax.set_ylabel("decode tg128, tokens/s")
        ax.set_title(f"{res['backbone']} backbones, storage {res['profile']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center", ncol=3)
    fig.suptitle("Decode speed under a RAM cap")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def write_docs(text: str) -> None:
    begin, end = "<!-- envelope:begin (generated by scripts/envelope --write-docs) -->", "<!-- envelope:end -->"
    doc = bench.DOC.read_text()
    if begin not in doc:
        sys.exit(f"error: {bench.DOC} has no {begin} marker")
    head, rest = doc.split(begin, 1)
    bench.DOC.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


STAGES = ("sweep", "bisect", "targets", "modes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default="ufs31")
    ap.add_argument("--backbone", choices=bench.BACKBONES, default="q4_0")
    ap.add_argument("--models", default=",".join(MODELS), help="the sweep's models")
    ap.add_argument("--caps", default="64,128,256,512,1024,none",
                    help="MiB over MeKi-1.7B's in-RAM size (backbone + branch), or none (uncapped)")
    ap.add_argument("--rounds", type=int, default=3, help="the sweep's interleaved rounds")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="what to run, of sweep, bisect, targets, modes; the others' saved results (of this "
                         "backbone and profile) are kept")
    ap.add_argument("--bisect", default="meki-1.7b,dense-1.7b,dense-4b", metavar="MODELS",
                    help="the models whose RAM for full speed is bisected")
    ap.add_argument("--target-rounds", type=int, default=3,
                    help="rounds of the two 1.7B models at MeKi's full-speed cap")
    ap.add_argument("--append", action="store_true",
                    help="add the sweep's and targets' rounds to the saved ones instead of replacing them")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md and docs/envelope.png "
                    "from every backbone and profile measured")
    ap.add_argument("--report", action="store_true", help="only report the saved results")
    args = ap.parse_args()
    stages = args.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        ap.error(f"unknown stage(s) {', '.join(sorted(unknown))}: the stages are {', '.join(STAGES)}")
    if args.report:
        sets = saved()
        print(report_all(sets))
        if args.write_docs:
            plot(sets)
            write_docs(report_all(sets))
        return

    version = cgroup_version()
    remove_stale_cgroups()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))   # cleanup as Ctrl-C
    bench.OUT.mkdir(parents=True, exist_ok=True)
    bench.make_models(False, (args.backbone,))
    models = args.models.split(",")
    bb = args.backbone
    device = block_device(bench.model_path(models[0], bb))
    profile = PROFILES[args.profile]
    caps = [None if c == "none" else int(c) for c in args.caps.split(",")]
    out = results_path(bb, args.profile)
    old = json.loads(out.read_text()) if out.exists() else {}
    log(f"cgroup v{version}, models on {device}, profile {args.profile} {profile}, stages {stages}")
    res = {**old, "machine": bench.machine(), "cgroup": version, "profile": args.profile, "throttle": profile,
           "threads": args.threads, "backbone": bb,
           "in_ram_mib": {m: in_ram_bytes(bench.model_path(m, bb)) / MiB for m in MODELS},
           "file_mib": {m: bench.model_path(m, bb).stat().st_size / MiB for m in MODELS}}
    res["cap_base_mib"] = res["in_ram_mib"]["meki-1.7b"]

    def save():
        out.write_text(json.dumps(res, indent=1))

    def kept(key: str) -> tuple[list[dict], int]:
        """The saved rows of `key` when appending, their next round number."""
        rows = old.get(key, []) if args.append else []
        return rows, max((r["round"] for r in rows), default=-1) + 1

    try:
        if "sweep" in stages:
            rows, first = kept("rows")
            res["rows"] = rows + sweep(models, bb, int(res["cap_base_mib"] * MiB), caps, args.rounds, args.threads,
                                       profile, version, device, first)
            save()
        unc = {m: med([r for r in res.get("rows", []) if r["model"] == m and r["cap_mib"] is None], "tg")
               for m in MODELS}
        if "bisect" in stages:
            new = [bisect(m, bb, args.threads, profile, version, device) for m in args.bisect.split(",")]
            res["bisect"] = [b for b in res.get("bisect", []) if b["model"] not in {n["model"] for n in new}] + new
            save()
        cap = {b["model"]: b["cap_mib"] for b in res.get("bisect", [])}.get("meki-1.7b")
        if set(stages) & {"targets", "modes"} and not cap:
            sys.exit(f"error: no full-speed cap of meki-1.7b in {out}: run the bisect stage first")
        if "targets" in stages:
            # both 1.7B models at MeKi's full-speed cap, interleaved
            rows, first = kept("at_meki_cap")
            pair = ["meki-1.7b", "dense-1.7b"]
            for r in range(first, first + args.target_rounds):
                for m in (pair if r % 2 == 0 else pair[::-1]):
                    row = measure(bench.model_path(m, bb), cap * MiB, profile, args.threads, version, device,
                                  what=("ttft", "tg"), uncapped_tg=unc[m])
                    row.update(round=r, model=m)
                    rows.append(row)
                    log(f"at MeKi's cap {cap} MiB: {m} {row['outcome']} tg {row['tg'] or 0:.2f} t/s "
                        f"ttft {row['ttft_s'] or 0:.2f} s {(row['read_per_token'] or 0) / 4096:.2f} pages/token")
            res["at_meki_cap"] = rows
            save()
        if "modes" in stages:
            # llama.cpp's other load modes at that cap: none of them may read the table whole
            res["load_modes"] = []
            for mode in ("mmap", "none", "dio", "mlock"):
                row = measure(bench.model_path("meki-1.7b", bb), cap * MiB, profile, args.threads, version, device,
                              what=("ttft", "tg"), uncapped_tg=unc["meki-1.7b"], load_mode=mode)
                row["load_mode"] = mode
                res["load_modes"].append(row)
                log(f"load mode {mode}: {row['outcome']} tg {row['tg'] or 0:.2f} t/s, ttft {row['ttft_s'] or 0:.2f} s, "
                    f"peak cgroup {row['peak_cgroup_mib']:.0f} MiB")
            save()
    except KeyboardInterrupt:
        sys.exit("interrupted: control groups removed")
    save()
    log(f"results in {out}")
    print(report(res))
    if args.write_docs:
        sets = saved()
        plot(sets)
        write_docs(report_all(sets))


if __name__ == "__main__":
    main()
