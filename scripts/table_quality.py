#!/usr/bin/env python3
"""Quality of each table type: the MeKi GGUF's table re-quantized (`meki-gguf quantize`, backbone
left as it is) against the same model with its f32 table, on held-out text.

    .venv/bin/python scripts/table_quality.py [MODEL.gguf] [--text FILE] [--chunks N]

MODEL must have an f32 (or f16/bf16) table, e.g. `meki-gguf convert --table-type f32`; without it
a random-weight model (the real fold of a random checkpoint, Qwen's vocabulary) is built and cached
in build/bench/. The logits of MODEL are saved once (llama-perplexity --kl-divergence-base), then
each type's mean KL divergence and top-1 agreement against them (--kl-divergence) are measured.
Prints a markdown table: bytes read per token, table size, mean KLD, top-1 agreement.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402

from meki_gguf.quantize import TABLE_TYPES, block_size, quantize, read_table_info  # noqa: E402
from meki_gguf.runtime import llama_tool, read_header  # noqa: E402

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


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


def demo_inputs(out: Path) -> tuple[Path, Path]:
    """The trained demo model (scripts/train_demo.py's cached checkpoint, default run) converted
    with an f32 table, and its held-out pages (the same split) as one text file."""
    runs = sorted((ROOT / "build" / "demo").glob("s0-n240-*/meki-demo"))
    docs = ROOT / "build" / "demo" / "docs.json"
    if not runs or not docs.is_file():
        raise SystemExit("no trained demo checkpoint in build/demo/: run scripts/train_demo.py first")
    model, text = out / "meki-demo-f32.gguf", out / "meki-demo-heldout.txt"
    if not model.exists():
        from meki_gguf.checkpoint import load_checkpoint
        from meki_gguf.write import write_gguf
        write_gguf(load_checkpoint(runs[-1]), model, outtype="f16", table_type="f32", progress=False)
    if not text.exists():
        import json
        sys.path.insert(0, str(ROOT / "scripts"))
        from train_demo import split
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


def parse(log: str) -> tuple[float, float] | None:
    """(mean KLD, top-1 agreement in %) from llama-perplexity's KL summary or, when its asynchronous
    logger lost the lines printed just before exit (it does, e.g. for bf16 here), from the running
    means on the last chunk's row (fewer decimals); None if neither is there."""
    kld = re.search(r"Mean\s+KLD:\s+(-?[\d.]+)", log)
    top = re.search(r"Same top p:\s+([\d.]+)", log)
    if kld and top:
        return float(kld.group(1)), float(top.group(1))
    # else the running means on the last chunk's row: ... KLD +- u, dp RMS +- u %, same top +- u %
    rows = re.findall(r"^\s*\d+\s+\S+ ± \S+\s+\S+ ± \S+\s+(-?[\d.]+) ± \S+\s+\S+ ± \S+ %\s+([\d.]+) ± \S+ %",
                      log, re.M)
    return (float(rows[-1][0]), float(rows[-1][1])) if rows else None


def kl(model: Path, text: Path, base: Path, ctx: int, chunks: int, threads: int) -> tuple[float, float]:
    for _ in range(3):                                      # the lost lines are now and then all of them
        log = perplexity(model, text, base, ctx, chunks, threads, kld=True)
        if (res := parse(log)) is not None:
            return res
    raise SystemExit(f"no KL figures in llama-perplexity's output on {model.name}:\n{log[-1500:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="MeKi GGUF with an f32/f16/bf16 table (default: random)")
    ap.add_argument("--demo", action="store_true",
                    help="the trained demo model (build/demo/, scripts/train_demo.py) on its held-out pages")
    ap.add_argument("--text", type=Path, help=f"held-out text (default {DEFAULT_TEXT})")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8, help="chunks of --ctx tokens (default 8)")
    ap.add_argument("--types", nargs="*", help="table types (default: every type whose block divides m)")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    if args.demo:
        args.model, demo_text = demo_inputs(ROOT / "build" / "bench")
        args.text = args.text or demo_text
    args.text = args.text or DEFAULT_TEXT
    model = args.model or random_model(ROOT / "build" / "bench" / "quality-random-f32.gguf")
    cur, m = read_table_info(model)
    kv, tensors = read_header(model, meki=True)
    L, V = kv["meki.block_count"], tensors["meki_mem.weight"].shape[1]
    types = args.types or [t for t in TABLE_TYPES if m % block_size(t) == 0]
    print(f"model {model} (table {cur}, {L} layers, m {m}, {V} rows), text {args.text}, "
          f"{args.chunks} x {args.ctx} tokens", file=sys.stderr)

    rows = []
    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        base = Path(tmp) / "base.kld"
        perplexity(model, args.text, base, args.ctx, args.chunks, args.threads, kld=False)
        for t in types:
            q = Path(tmp) / f"{t}.gguf"
            if t == cur:                                    # the reference itself
                q, kld, top = model, 0.0, 100.0
            else:
                quantize(model, q, t, threads=args.threads)
                kld, top = kl(q, args.text, base, args.ctx, args.chunks, args.threads)
            blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.upper()]]
            per_tok = L * m // blk * size
            rows.append((t, per_tok, per_tok * V, kld, top))
            print(f"{t:7} {per_tok:6} B/token  KLD {kld:.6f}  top-1 {top:.2f}%", file=sys.stderr)
            if q != model:
                q.unlink()

    print("| table type | bits/value | bytes read per token | table size | mean KLD vs f32 | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for t, per_tok, total, kld, top in rows:
        print(f"| {t} | {8 * per_tok / (L * m):.2f} | {per_tok:,} | {total / 2**20:,.1f} MiB | {kld:.6f} | {top:.2f}% |")


if __name__ == "__main__":
    main()
