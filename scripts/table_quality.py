#!/usr/bin/env python3
"""Quality of each table type and quantization method: the MeKi GGUF's table re-quantized
(`meki-gguf quantize --table-type T`, method plain / weighted / scaled, backbone left as it is)
against the same model with its f32 table, on held-out text.

    .venv/bin/python scripts/table_quality.py [MODEL.gguf | --demo] [--text FILE] [--chunks N]
    .venv/bin/python scripts/table_quality.py --plot     # docs/table-quality.png from the saved runs

MODEL must have an f32 (or f16/bf16) table, e.g. `meki-gguf convert --table-type f32`. --demo: the
trained demo model (scripts/train_demo.py's cached checkpoint, at --d-mem, default 256) on its own
held-out pages; without either a random-weight model (the real fold of a random checkpoint, Qwen's
vocabulary) is built and cached in build/bench/. The logits of MODEL are saved once
(llama-perplexity --kl-divergence-base), then each quantized table's mean KL divergence, top-1
agreement and perplexity against them (--kl-divergence). Prints a markdown table and saves the
results to build/bench/table-quality-NAME.json.

A what-if of a format that is not built (docs/BENCHMARKS.md says why), from tables dequantized in
numpy (gguf-py) and written back as an f32 table, which llama.cpp then runs:
  --layers T         T in one layer at a time, the other layers f32: each layer's sensitivity.

Two-tier tables (docs/FORMAT.md), in the real format (`meki-gguf quantize --cold-type`), against
single-type tables in one run:
  --two-tier K:H:C ...  the first K rows of the row order in type H, the rest in C; --singles T ...
                        the single types beside them (T, or T-METHOD); --row-order-text FILE: the
                        row order measured on that text (tokens by frequency), else the token ids.
  Each table's logits at every position of the text (the binding, logits_all; llama-perplexity's
  positions: the second half of each chunk) against the f32 table's: mean KLD, top-1, and the
  mean KLD over the positions whose input token is in the cold tier, for the two-tier tables and
  for every single type on the same positions. Saved to build/bench/table-tiers-NAME-TEXT.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402
import numpy as np  # noqa: E402

from meki_gguf.quantize import (DEFAULT_METHOD, FLOAT_TYPES, TABLE, TABLE_TYPES, WEIGHTED,  # noqa: E402
                                block_size, file_scales, methods_for, quantize, read_table_info, rewrite,
                                row_order_from_text, text_ids)
from meki_gguf.runtime import llama_tool, read_header  # noqa: E402

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
BENCH = ROOT / "build" / "bench"


def random_model(path: Path) -> Path:
    """A random MeKi checkpoint (4 layers, d 512, m 256: every block size divides m), folded and
    written with an f32 table and an f16 backbone by the converter."""
    if path.exists():
        return path
    from meki_gguf.checkpoint import Checkpoint
    from meki_gguf.model import MekiConfig, init_random
    from meki_gguf.write import write_gguf

    c = MekiConfig(vocab_size=151680, n_layer=4, d_model=512, d_mem=256, d_ff=1536, n_head=8, n_kv_head=4,
                   head_dim=64)
    ckpt = Checkpoint(c, init_random(c, seed=1).state_dict(), "hf", path.parent)
    return write_gguf(ckpt, path, outtype="f16", table_type="f32",
                      tokenizer=ROOT / "build" / "src" / "models" / "ggml-vocab-qwen2.gguf", progress=False)


def demo_inputs(out: Path, d_mem: int) -> tuple[Path, Path]:
    """The trained demo model (scripts/train_demo.py's cached checkpoint, default run at m = d_mem)
    converted with an f32 table, and its held-out pages (the same split) as one text file."""
    # the first demo's recipe (240 steps, pages only), on which docs/BENCHMARKS.md measured the types
    runs = sorted((ROOT / "build" / "demo").glob(f"s0-n240-b8-*-m{d_mem}-*-v4096/meki-demo"))
    docs = ROOT / "build" / "demo" / "docs.json"
    if not runs or not docs.is_file():
        raise SystemExit(f"no trained demo checkpoint with m = {d_mem} in build/demo/: run scripts/train_demo.py "
                         f"--d-mem {d_mem} --steps 240 --batch 8 --no-qa --eval-every 240 --skip-bench first")
    model, text = out / f"meki-demo-m{d_mem}-f32.gguf", out / "meki-demo-heldout.txt"
    if not model.exists():
        from meki_gguf.checkpoint import load_checkpoint
        from meki_gguf.write import write_gguf
        write_gguf(load_checkpoint(runs[-1]), model, outtype="f16", table_type="f32", progress=False)
    if not text.exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        from demo_corpus import split
        _, held = split(json.loads(docs.read_text()), 0)
        text.write_text("\n\n".join(t for _, t in held))
    return model, text


def perplexity(model: Path, text: Path, base: Path, ctx: int, chunks: int, threads: int, kld: bool) -> str:
    cmd = [str(llama_tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
           "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(base)]
    p = subprocess.run(cmd + (["--kl-divergence"] if kld else []), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"llama-perplexity failed on {model.name}:\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def figure(log: str, pattern: str, what: str, model: Path) -> float:
    """One figure of llama-perplexity's summary (patch 0011 makes it print the summary whole before
    it exits: llama.cpp's logger used to drop the last lines now and then)."""
    if (m := re.search(pattern, log)) is None:
        raise SystemExit(f"no {what} in llama-perplexity's output on {model.name}:\n{log[-1500:]}")
    return float(m.group(1))


def kl(model: Path, text: Path, base: Path, ctx: int, chunks: int, threads: int) -> tuple[float, float, float]:
    """(mean KLD, top-1 agreement in %, perplexity) of `model` against the saved logits `base`."""
    log = perplexity(model, text, base, ctx, chunks, threads, kld=True)
    return (figure(log, r"Mean\s+KLD:\s+(-?[\d.]+)", "mean KLD", model),
            figure(log, r"Same top p:\s+([\d.]+)", "top-1 agreement", model),
            figure(log, r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "perplexity", model))


def bits(t: str) -> float:
    blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.upper()]]
    return 8 * size / blk


def dequantized(path: Path) -> np.ndarray:
    """The table of a MeKi GGUF as the graph sees it, in numpy: dequantized, times its scales."""
    r = gguf.GGUFReader(path)
    t = next(x for x in r.tensors if x.name == TABLE)
    rows = gguf.quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
    s = file_scales(r)
    return rows.astype(np.float32) * (1 if s is None else s)


def with_table(src: Path, dst: Path, table: np.ndarray) -> Path:
    """A copy of the unscaled f32-table GGUF `src` with another f32 table."""
    return rewrite(src, dst, replace={TABLE: table})


def text_tokens(model: Path, text: Path, ctx: int, chunks: int) -> np.ndarray:
    """The token ids llama-perplexity evaluates (the first chunks x ctx of the text)."""
    return text_ids(model, text)[0][: chunks * ctx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="MeKi GGUF with an f32/f16/bf16 table (default: random)")
    ap.add_argument("--demo", action="store_true",
                    help="the trained demo model (build/demo/, scripts/train_demo.py) on its held-out pages")
    ap.add_argument("--d-mem", type=int, default=256, help="--demo: the demo run's m (default 256)")
    ap.add_argument("--text", type=Path, help=f"held-out text (default {DEFAULT_TEXT})")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8, help="chunks of --ctx tokens (default 8)")
    ap.add_argument("--types", nargs="*", help="table types (default: every type whose block divides m)")
    ap.add_argument("--methods", nargs="*", default=["plain", "weighted", "scaled"])
    ap.add_argument("--layers", metavar="TYPE", help="what-if: TYPE in one layer at a time")
    ap.add_argument("--two-tier", nargs="*", metavar="K:HOT:COLD",
                    help="two-tier tables: the first K rows of the row order in HOT, the rest in COLD")
    ap.add_argument("--singles", nargs="*", default=[], metavar="TYPE[-METHOD]",
                    help="with --two-tier: single-type tables measured the same way, beside them")
    ap.add_argument("--row-order-text", type=Path, metavar="FILE",
                    help="with --two-tier: the row order measured on FILE's tokens (default: the token ids)")
    ap.add_argument("--plot", action="store_true",
                    help="plot the saved runs to docs/table-quality.png and print their tables")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.plot:
        return plot()

    BENCH.mkdir(parents=True, exist_ok=True)             # a fresh clone has no build/bench
    name, own_text = "random", args.text
    if args.demo:
        args.model, demo_text = demo_inputs(BENCH, args.d_mem)
        args.text, name = args.text or demo_text, f"demo-m{args.d_mem}"
    args.text = args.text or DEFAULT_TEXT
    model = args.model or random_model(BENCH / "quality-random-f32.gguf")
    name = name if args.demo or args.model is None else model.stem
    name += f"-{own_text.stem}" if own_text else ""        # another text: another run
    cur, m = read_table_info(model)
    kv, tensors = read_header(model, meki=True)
    L, V = kv["meki.block_count"], tensors[TABLE].shape[1]
    types = args.types or [t for t in TABLE_TYPES if m % block_size(t) == 0]
    print(f"model {model} (table {cur}, {L} layers, m {m}, {V} rows), text {args.text}, "
          f"{args.chunks} x {args.ctx} tokens", file=sys.stderr)

    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        if args.two_tier:
            args.name = name
            return tiers(args, model, Path(tmp), L, m, V)
        base = Path(tmp) / "base.kld"
        log = perplexity(model, args.text, base, args.ctx, args.chunks, args.threads, kld=False)
        ref_ppl = figure(log, r"Final estimate: PPL = ([\d.]+)", "perplexity", model)
        if args.layers:
            return what_if(args, model, base, Path(tmp), L, m, V, ref_ppl)
        rows = []
        for t in types:
            blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.upper()]]
            row = {"type": t, "bits": bits(t), "per_token": L * m // blk * size, "scale_bytes": 0, "methods": {}}
            row["size"] = row["per_token"] * V
            for meth in [x for x in methods_for(t) if x in args.methods]:
                q = Path(tmp) / f"{t}-{meth}.gguf"
                if t == cur:                                    # the reference itself
                    row["methods"][meth] = {"kld": 0.0, "top1": 100.0, "ppl": ref_ppl}
                    continue
                quantize(model, q, t, method=meth, threads=args.threads)
                kld, top, p = kl(q, args.text, base, args.ctx, args.chunks, args.threads)
                row["methods"][meth] = {"kld": kld, "top1": top, "ppl": p}
                if meth == "scaled":
                    row["scale_bytes"] = 4 * L * m
                print(f"{t:7} {meth:8} {row['per_token']:6} B/token  KLD {kld:.6f}  top-1 {top:.2f}%  "
                      f"PPL {p}", file=sys.stderr, flush=True)
                q.unlink()
            rows.append(row)

    res = {"model": str(model), "name": name, "text": str(args.text), "ctx": args.ctx, "chunks": args.chunks,
           "L": L, "m": m, "V": V, "ref_ppl": ref_ppl, "default": {t: DEFAULT_METHOD.get(t, "plain") for t in types},
           "rows": rows}
    (BENCH / f"table-quality-{name}.json").write_text(json.dumps(res, indent=1))
    print(markdown(res))


def markdown(res: dict) -> str:
    ppl = res["ref_ppl"] is not None and res["name"].startswith("demo")
    head = ["table type", "bits/value", "bytes read per token", "table size",
            "KLD plain", "KLD weighted", "KLD scaled", "top-1 (default)"] + (["perplexity (default)"] if ppl else [])
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in res["rows"]:
        ms, d = r["methods"], res["default"].get(r["type"], "plain")
        best = min(ms.values(), key=lambda x: x["kld"]) if ms else None

        def cell(k):
            if k not in ms:
                return "-"
            s = f"{ms[k]['kld']:.6f}"
            return f"**{s}**" if ms[k] is best and len(ms) > 1 else s
        dm = ms.get(d) or ms.get("plain") or best
        size = r["size"] + (r["scale_bytes"] if d == "scaled" else 0)
        cells = [r["type"], f"{r['bits']:.2f}", f"{r['per_token']:,}", f"{size / 2**20:,.1f} MiB",
                 cell("plain"), cell("weighted"), cell("scaled"), f"{dm['top1']:.2f}%"]
        if ppl:
            cells.append(f"{dm['ppl']:.3f}" if dm.get("ppl") else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown_long(res: dict) -> str:
    """One row per type and method, with top-1 and perplexity (the trained model's) per method."""
    ppl = res["name"].startswith("demo")
    head = ["table type", "method", "bits/value", "bytes read per token", "table size", "mean KLD vs f32",
            "top-1 agreement"] + (["held-out perplexity"] if ppl else [])
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in res["rows"]:
        for meth, x in r["methods"].items():
            d = " (default)" if res["default"].get(r["type"], "plain") == meth and r["type"] not in FLOAT_TYPES else ""
            size = r["size"] + (r["scale_bytes"] if meth == "scaled" else 0)
            cells = [r["type"], meth + d, f"{r['bits']:.2f}", f"{r['per_token']:,}", f"{size / 2**20:,.1f} MiB",
                     f"{x['kld']:.6f}", f"{x['top1']:.2f}%"] + ([f"{x['ppl']:.3f}" if x.get("ppl") else "-"] if ppl else [])
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def what_if(args, model: Path, base: Path, tmp: Path, L: int, m: int, V: int, ref_ppl) -> None:
    """The --layers and --two-tier measurements (formats not built), f32 tables from numpy."""
    ref = dequantized(model)
    cache: dict[str, np.ndarray] = {}

    def table_of(t: str) -> np.ndarray:
        if t not in cache:
            q = quantize(model, tmp / f"{t}.gguf", t, threads=args.threads)
            cache[t] = dequantized(q)
            q.unlink()
        return cache[t]

    def measure(table: np.ndarray) -> tuple[float, float, float | None]:
        f = with_table(model, tmp / "what-if.gguf", table)
        try:
            return kl(f, args.text, base, args.ctx, args.chunks, args.threads)
        finally:
            f.unlink()

    if args.layers:
        print(f"| layer in {args.layers} (the others f32) | mean KLD vs f32 | top-1 |\n|---|---:|---:|")
        for il in range(L):
            t = ref.copy()
            t[:, il * m:(il + 1) * m] = table_of(args.layers)[:, il * m:(il + 1) * m]
            kld, top, _ = measure(t)
            print(f"| {il} | {kld:.6f} | {top:.2f}% |", flush=True)
        kld, top, _ = measure(table_of(args.layers))
        print(f"| all | {kld:.6f} | {top:.2f}% |")


def scored(ctx: int) -> slice:
    """The positions of a chunk that llama-perplexity scores: its second half (position i predicts
    token i + 1)."""
    return slice(ctx // 2, ctx - 1)


def log_probs(model: Path, ids: np.ndarray, ctx: int, threads: int):
    """Per chunk of `ctx` tokens, the model's log-probabilities at the scored positions, float32."""
    from meki_gguf import runtime
    from meki_gguf.parity import log_softmax
    llm = runtime.load(model, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads,
                       n_threads_batch=threads)
    for lo in range(0, len(ids) - ctx + 1, ctx):
        llm.reset()
        llm.eval([int(t) for t in ids[lo:lo + ctx]])
        yield log_softmax(np.array(llm.scores[scored(ctx)], np.float32))


def position_kl(model: Path, ids: np.ndarray, ctx: int, threads: int, base: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(KL(P_f32 || P_model), top-1 agreement) at each scored position; `base` holds the f32
    table's log-probabilities, one file per chunk (written when missing)."""
    kls, same = [], []
    for i, lp in enumerate(log_probs(model, ids, ctx, threads)):
        if not base[i].exists():
            np.save(base[i], lp)
            kls.append(np.zeros(len(lp)))
            same.append(np.ones(len(lp), bool))
            continue
        ref = np.load(base[i])
        kls.append((np.exp(ref) * (ref - lp)).sum(-1, dtype=np.float64))
        same.append(ref.argmax(-1) == lp.argmax(-1))
    return np.concatenate(kls), np.concatenate(same)


def tiers(args, model: Path, tmp: Path, L: int, m: int, V: int) -> None:
    """Two-tier tables in the real format and single types, each against the f32 table at every
    scored position of the text; the cold-token KLD of each two-tier table, and of every single type
    on the same positions."""
    ids = text_tokens(model, args.text, args.ctx, args.chunks)
    inputs = np.concatenate([ids[lo:lo + args.ctx][scored(args.ctx)] for lo in range(0, len(ids) - args.ctx + 1, args.ctx)])
    order = row_order_from_text(model, args.row_order_text) if args.row_order_text else np.arange(V)
    base = [tmp / f"base-{i}.npy" for i in range(args.chunks)]
    position_kl(model, ids, args.ctx, args.threads, base)                       # the f32 table's own
    runs = {}
    cache = BENCH / "tiers-cache"                  # the tables, kept for the other texts' runs
    cache.mkdir(parents=True, exist_ok=True)
    order_tag = f"-order-{args.row_order_text.stem}" if args.row_order_text else ""

    def table(spec: str, make) -> Path:
        q = cache / f"{model.stem}-{spec.replace(':', '_')}{order_tag if ':' in spec else ''}.gguf"
        return q if q.exists() else make(q)
    for spec in args.singles:
        t, _, meth = spec.partition("-")
        q = table(spec, lambda q: quantize(model, q, t, method=meth or None, threads=args.threads))
        kl, same = position_kl(q, ids, args.ctx, args.threads, base)
        runs[spec] = {"bits": bits(t), "per_token": L * m * bits(t) / 8, "kl": kl, "top1": same.mean()}
        print(f"{spec:14} {bits(t):.2f} bits  KLD {kl.mean():.6f}  top-1 {100 * same.mean():.2f}%", file=sys.stderr, flush=True)
    for spec in args.two_tier:
        k, hot, cold = spec.split(":")
        k = int(k)
        q = table(spec, lambda q: quantize(model, q, hot, cold_type=cold, hot_rows=k,
                                           row_order=order if args.row_order_text else None, threads=args.threads))
        kl, same = position_kl(q, ids, args.ctx, args.threads, base)
        is_cold = order[inputs] >= k
        share = float((order[ids] < k).mean())
        runs[spec] = {"bits": (k * bits(hot) + (V - k) * bits(cold)) / V, "share": share, "cold": is_cold,
                      "per_token": L * m * (share * bits(hot) + (1 - share) * bits(cold)) / 8,
                      "kl": kl, "top1": same.mean()}
        print(f"{spec:20} {runs[spec]['bits']:.2f} bits  hot share {share:.1%}  KLD {kl.mean():.6f}  "
              f"cold-token KLD {kl[is_cold].mean():.6f}  top-1 {100 * same.mean():.2f}%", file=sys.stderr, flush=True)
    res = {"model": str(model), "name": args.name, "text": str(args.text), "ctx": args.ctx, "chunks": args.chunks,
           "L": L, "m": m, "V": V, "order": str(args.row_order_text or "token ids"), "positions": int(len(inputs)),
           "runs": {s: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for s, r in runs.items()}}
    (BENCH / f"table-tiers-{args.name}-{args.text.stem}{order_tag}.json").write_text(json.dumps(res))
    print(tiers_markdown(res))


def tiers_markdown(res: dict) -> str:
    """One row per table: bits, bytes read per token, mean KLD, top-1; for each two-tier table its
    cold-token KLD, and each single type's on the positions of the first two-tier table's cold tokens."""
    runs = res["runs"]
    tiered = [s for s in runs if ":" in s]
    cold = np.asarray(runs[tiered[0]]["cold"], bool) if tiered else None
    head = ("| table | bits/value | MeKi-1.7B's table | its bytes read per token (this text) | mean KLD vs f32 | "
            f"KLD at the cold tier's tokens{f' ({tiered[0]})' if tiered else ''} | top-1 |\n|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for spec, r in sorted(runs.items(), key=lambda x: -x[1]["bits"]):
        kl = np.asarray(r["kl"])
        c = np.asarray(r["cold"], bool) if "cold" in r else cold
        label = spec if ":" not in spec else "{:,} rows {} / {}".format(int(spec.split(":")[0]), *spec.split(":")[1:])
        size = 28 * 256 * 151680 * r["bits"] / 8 / 2**30          # MeKi-1.7B: L 28, m 256, 151,680 rows
        rows.append(f"| {label} | {r['bits']:.2f} | {size:.2f} GiB | {r['per_token'] * 28 / res['L']:,.0f} | "
                    f"{kl.mean():.6f} | {kl[c].mean() if c is not None and c.any() else float('nan'):.6f} | {100 * r['top1']:.2f}% |")
    return head + "\n" + "\n".join(rows)


def plot() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(BENCH.glob("table-quality-*.json"))]
    if not runs and not list(BENCH.glob("table-tiers-*.json")):
        raise SystemExit("no saved runs in build/bench/: run the measurements first")
    if not runs:                           # two-tier runs only: docs/table-quality.png is left as it is
        return plot_tiers(plt)
    full = [r for r in runs if len(r["rows"]) > 10]        # a sweep of every type (not a spot check)
    fig, axes = plt.subplots(1, len(full), figsize=(7 * len(full), 5.2), squeeze=False)
    style = {"plain": ("tab:gray", "o", "plain (llama.cpp's rounding)"),
             "weighted": ("tab:blue", "s", "weighted (rounding search, uniform importance)"),
             "scaled": ("tab:red", "^", "scaled (column RMS stored apart, weighted by s²)")}
    for res in runs:                       # the tables, with the defaults as they are now
        res["default"] = {r["type"]: DEFAULT_METHOD.get(r["type"], "plain") for r in res["rows"]}
        print(f"\n{res['name']} ({res['model']}, {res['chunks']} x {res['ctx']} tokens of {res['text']}):\n")
        print(markdown(res))
        print("\n<details><summary>every type and method</summary>\n")
        print(markdown_long(res))
        print("\n</details>")
    for ax, res in zip(axes[0], full):
        for meth, (color, marker, label) in style.items():
            # every type a marker; the line joins the method's front (no type with fewer or as
            # many bits has a lower KLD); a type without a weighted search is its plain self in "weighted"
            pts = sorted((r["bits"], r["methods"][m]["kld"], r["type"]) for r in res["rows"]
                         for m in ([meth] + (["plain"] if meth == "weighted" and r["type"] not in WEIGHTED else []))
                         if m in r["methods"] and r["methods"][m]["kld"] > 0 and r["bits"] < 9)
            if not pts:
                continue
            front = [p for p in pts if not any(q[0] <= p[0] and q[1] < p[1] for q in pts)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, s=14, zorder=3)
            ax.plot([p[0] for p in front], [p[1] for p in front], color=color, lw=1, label=label,
                    ls="-" if meth != "plain" else "--")
            if meth == "scaled":
                for b, k, t in pts:
                    ax.annotate(t, (b, k), fontsize=6, xytext=(3, 2), textcoords="offset points")
        q4 = next((r["methods"]["plain"]["kld"] for r in res["rows"] if r["type"] == "q4_0"), None)
        if q4:
            ax.axhline(q4, color="k", lw=0.6, ls=":", label="plain q4_0 (the goal for ~3 bits)")
        style_axes(ax, f"{res['name']}: L {res['L']}, m {res['m']}, {res['V']:,} rows\n"
                       f"{Path(res['text']).name}, {res['chunks']} x {res['ctx']} tokens", 7)
    save(fig, "table-quality.png")
    plot_tiers(plt)


def style_axes(ax, title: str, legend: float) -> None:
    """The KLD-against-bits axes of both plots."""
    ax.set_yscale("log")
    ax.set_xlabel("bits per value (block scales included)")
    ax.set_ylabel("mean KLD vs the f32 table")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend)


def save(fig, name: str) -> None:
    fig.tight_layout()
    out = ROOT / "docs" / name
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def plot_tiers(plt) -> None:
    """docs/table-tiers.png: per text, the single types and the two-tier tables (real format) in the
    token ids' order and in a measured frequency order, mean KLD against bits per value; and the tables."""
    runs = [json.loads(p.read_text()) for p in sorted(BENCH.glob("table-tiers-*.json"))]
    if not runs:
        return
    texts = sorted({(r["name"], r["text"]) for r in runs}, key=lambda x: x[1])
    fig, axes = plt.subplots(1, len(texts), figsize=(5.6 * len(texts), 4.8), squeeze=False)
    for ax, (name, text) in zip(axes[0], texts):
        for res in [r for r in runs if (r["name"], r["text"]) == (name, text)]:
            print(f"\n{res['name']}, {Path(res['text']).name} ({res['chunks']} x {res['ctx']} tokens, {res['positions']} "
                  f"positions scored; row order: {Path(res['order']).name}):\n")
            print(tiers_markdown(res))
            ordered = res["order"] != "token ids"
            for tiered, color, marker, label in (
                    (False, "tab:gray", "o", "one type"),
                    (True, "tab:purple" if ordered else "tab:green", "s" if ordered else "D",
                     f"two tiers, rows by frequency in {Path(res['order']).name}" if ordered else "two tiers, rows by token id")):
                pts = [(r["bits"], float(np.mean(r["kl"])), s) for s, r in res["runs"].items() if (":" in s) == tiered]
                if not pts:
                    continue
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, s=18, zorder=3, label=label)
                for b, k, s in pts:
                    lab = s if ":" not in s else "{}/{} {:,}".format(*s.split(":")[1:], int(s.split(":")[0]))
                    ax.annotate(lab, (b, k), fontsize=5.5, xytext=(3, 2), textcoords="offset points", color=color)
        style_axes(ax, f"{name}: {Path(text).name}", 6.5)
    save(fig, "table-tiers.png")


if __name__ == "__main__":
    main()
