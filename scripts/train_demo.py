#!/usr/bin/env python3
"""Train the embedded demo model: a small MeKi model and its dense twin on a real English corpus.

    .venv/bin/python scripts/train_demo.py [--steps N] [--seed S] [--out build/demo] [--install]

Stages (each cached under --out, so a rerun only redoes what is missing):
1. corpus: the Debian package python3.11-doc (the Python 3.11 documentation, HTML; PSF License,
   see its /usr/share/doc/python3.11-doc/copyright), fetched with `apt-get download` (the pinned
   version when the archive has it), unpacked with `dpkg-deb -x`, and the main text of every page
   extracted with the standard library's html.parser. Split by document: a page is held out when
   sha256(seed:path) falls in the held-out fraction (5%), so no held-out page is seen in training.
2. tokenizer: a byte-level BPE (vocabulary 4096 including 3 ChatML specials) trained with the
   `tokenizers` library on the training split, with Qwen2's pre-tokenizer (llama.cpp pre "qwen2")
   and a ChatML chat template, exactly the recipe of meki_gguf.tokenizer.tiny_tokenizer_dir.
3. train: MeKi (training form: static table + dynamic projection; G without an input norm, as in
   the local spec, dyn_norm=False) and its dense twin (the same backbone, the same initial backbone
   weights, without the memory branch) on the same batches (same token stream, steps and seed);
   AdamW, linear warm-up then cosine decay. Held-out perplexity of both in PyTorch (float32) at
   equal training tokens.
4. export: MeKi -> save_hf -> write_gguf (f16 backbone, q8_0 table, the trained tokenizer); the
   dense twin -> a stock llama.cpp `qwen2` GGUF (f16; qwen2 = no QK-norm, rotate-half RoPE, its
   q/k/v biases optional: the same math). Both are checked against PyTorch through llama.cpp.
5. bench: decode speed of both in the patched llama-bench (-p 0 -n 128 -r 3), interleaved rounds.
Results: <out>/results.json; --install copies the MeKi GGUF to meki_gguf/data/meki-demo.gguf
with meki_gguf/data/meki-demo.json (its provenance).

Deterministic given --seed (and the thread count: float summation order), on CPU.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import asdict
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from meki_gguf.model import MekiConfig, MekiForCausalLM  # noqa: E402

PACKAGE, PACKAGE_VERSION = "python3.11-doc", "3.11.2-6+deb12u9"
LICENSE = "PSF License Agreement (Python documentation; Debian copyright file of python3.11-doc)"
HTML_ROOT = "usr/share/doc/python3.11/html"
SKIP = re.compile(r"^(genindex|py-modindex|search|_static|_sources|_images|_downloads)")
HELDOUT_FRAC = 0.05


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# --- 1. corpus ---------------------------------------------------------------------------------

class _MainText(HTMLParser):
    """The text of Sphinx's <div role="main">, blocks separated by newlines; no scripts, styles
    or the pilcrow header links."""
    BLOCK = {"p", "div", "li", "dt", "dd", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br",
             "section", "table", "ul", "ol", "dl", "blockquote"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []   # open elements inside the main div: (tag, skipped)
        self.out: list[str] = []

    def _skipping(self):
        return any(s for _, s in self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if not self.stack:
            if tag == "div" and a.get("role") == "main":
                self.stack.append((tag, False))
            return
        if tag in self.BLOCK:
            self.out.append("\n")
        if tag not in self.VOID:
            skip = tag in ("script", "style") or (tag == "a" and "headerlink" in (a.get("class") or ""))
            self.stack.append((tag, skip))

    def handle_endtag(self, tag):
        if not self.stack or tag in self.VOID:
            return
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.stack and not self._skipping():
            pre = any(t == "pre" for t, _ in self.stack)
            self.out.append(data if pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        t = "".join(self.out).replace("\u00b6", "")
        t = "\n".join(ln.rstrip() for ln in t.split("\n"))
        return re.sub(r"\n{3,}", "\n\n", t).strip()


def fetch_corpus(out: Path) -> Path:
    """The package's .deb (cached), unpacked; returns the html folder."""
    cache = out / "corpus"
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        r = subprocess.run(["apt-get", "download", f"{PACKAGE}={PACKAGE_VERSION}"], cwd=cache)
        if r.returncode:
            log(f"{PACKAGE}={PACKAGE_VERSION} not in the archive; taking its candidate version")
            subprocess.run(["apt-get", "download", PACKAGE], cwd=cache, check=True)
        debs = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    x = cache / "x"
    if not (x / HTML_ROOT).is_dir():
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(x)], check=True)
    return x / HTML_ROOT


def documents(html_root: Path) -> list[tuple[str, str]]:
    docs = []
    for p in sorted(html_root.rglob("*.html")):
        rel = p.relative_to(html_root).as_posix()
        if SKIP.match(rel):
            continue
        parser = _MainText()
        parser.feed(p.read_text(encoding="utf-8", errors="replace"))
        t = parser.text()
        if len(t) > 200:
            docs.append((rel, t))
    return docs


def split(docs, seed: int):
    train, held = [], []
    for rel, t in docs:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big") / 2**64
        (held if h < HELDOUT_FRAC else train).append((rel, t))
    return train, held


# --- 2. tokenizer ------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], out_dir: Path, n_tokens: int) -> Path:
    from meki_gguf.tokenizer import train_bpe_dir
    return train_bpe_dir(texts, out_dir, n_tokens)


def encode(tok_dir: Path, docs) -> np.ndarray:
    """All documents as one stream, each followed by <|endoftext|> (uint16)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for enc in tok.encode_batch([t for _, t in docs], add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


# --- 3. train ----------------------------------------------------------------------------------

class _NoMemory(nn.Module):
    """The dense twin's stand-in for the memory branch: contributes nothing, has no parameters."""

    def forward(self, ids, E, h):
        return 0.0


def dense_twin(meki: MekiForCausalLM) -> MekiForCausalLM:
    """The same backbone (same weights) without the memory branch."""
    dense = copy.deepcopy(meki)
    for blk in dense.model.layers:
        blk.meki = _NoMemory()
    return dense


def init_for_training(c: MekiConfig, seed: int) -> MekiForCausalLM:
    torch.manual_seed(seed)
    m = MekiForCausalLM(c)
    std = 0.02
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * c.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight",
                                                                     "meki.out_proj.weight")) else std
                p.normal_(0.0, s)
            elif name.endswith("weight"):
                p.fill_(1.0)
    return m


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batches(n_tokens: int, steps: int, batch: int, ctx: int, seed: int) -> torch.Tensor:
    """The start offsets of every step's sequences: [steps, batch] (the same for both models)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, n_tokens - ctx - 1, (steps, batch), generator=g)


@torch.no_grad()
def heldout_loss(model, held: torch.Tensor, ctx: int, bs: int = 16) -> float:
    model.eval()
    n = (len(held) - 1) // ctx
    x = held[: n * ctx].view(n, ctx)
    y = held[1: n * ctx + 1].view(n, ctx)
    tot = 0.0
    for i in range(0, n, bs):
        logits = model(x[i:i + bs]).logits
        tot += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + bs].flatten(), reduction="sum").item()
    model.train()
    return tot / (n * ctx)


def train(model, name: str, data: torch.Tensor, held: torch.Tensor, starts: torch.Tensor, a) -> dict:
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n and "memory" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed_tokens" not in n and "memory" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    steps, ctx = starts.shape[0], a.ctx
    offs = torch.arange(ctx + 1)
    warmup = max(1, steps // 20)
    t0, hist = time.time(), []
    model.train()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, a.lr, warmup)
        seq = data[starts[step][:, None] + offs]
        logits = model(seq[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"{name} step {step}/{steps} loss {statistics.fmean(hist[-50:]):.3f} "
                f"({el:.0f}s, {(step + 1) * starts.shape[1] * ctx / el:.0f} tok/s)")
    wall = time.time() - t0
    hl = heldout_loss(model, held, ctx)
    log(f"{name}: held-out loss {hl:.4f}, perplexity {math.exp(hl):.2f} ({wall:.0f}s)")
    return {"heldout_loss": hl, "heldout_ppl": math.exp(hl), "train_wall_s": wall,
            "final_train_loss": statistics.fmean(hist[-50:]), "loss_curve": hist[::10]}


# --- 4. export ---------------------------------------------------------------------------------

def write_dense_qwen2(dense_sd: dict, c: MekiConfig, tok_dir: Path, path: Path, name: str) -> Path:
    """The dense twin as a stock llama.cpp `qwen2` GGUF, f16 matrices, f32 norms."""
    import gguf

    from meki_gguf.tokenizer import tokenizer_kv
    from meki_gguf.synth import add_hparams, write_atomic
    from meki_gguf.write import gguf_name

    assert c.n_head * c.head_dim == c.d_model and not c.qk_norm, "qwen2 needs n_head*head_dim == d, no QK-norm"
    w = gguf.GGUFWriter(None, "qwen2")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(w, c)
    for k, v in tokenizer_kv(tok_dir, c.vocab_size).items():
        w.add_key_value(k, v.value, v.type, v.sub_type)
    for k, t in dense_sd.items():
        a = t.detach().float().numpy()
        w.add_tensor(gguf_name(k), a.astype(np.float16) if a.ndim == 2 else a)
    write_atomic(w, path)
    return path


def check_gguf(path: Path, model, ids: list[int]) -> dict:
    """llama.cpp (logits at every position of one prompt, f32 KV cache) vs the PyTorch model (float64)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=64, n_ubatch=16, logits_all=True,
                type_k=0, type_v=0, verbose=False)           # 0 = GGML_TYPE_F32
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    del llm
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0].numpy()
    from meki_gguf.parity import kl, rel_err
    return {"top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "mean_kl": float(kl(ref, got).mean()),
            "max_rel_err": float(rel_err(got, ref).max())}


# --- 5. bench ----------------------------------------------------------------------------------

def bench(paths: dict[str, Path], rounds: int, threads: int) -> dict:
    exe = ROOT / "build" / "cmake" / "bin" / "llama-bench"
    env = {**os.environ, "LD_LIBRARY_PATH": str(exe.parent)}
    res: dict[str, list[float]] = {k: [] for k in paths}
    samples: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            out = subprocess.run([str(exe), "-m", str(paths[k]), "-p", "0", "-n", "128", "-r", "3",
                                  "-t", str(threads), "-o", "json"], env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            rec = json.loads(out.stdout)[0]
            tps = rec["avg_ts"]
            res[k].append(tps)
            samples[k].extend(rec.get("samples_ts", [tps]))
            log(f"bench round {r} {k}: {tps:.1f} tok/s")
    ratios = [a / b for a, b in zip(res["meki"], res["dense"])]
    return {"tg128_tok_s": res, "median_tok_s": {k: statistics.median(v) for k, v in res.items()},
            "ratio_meki_over_dense_per_round": ratios, "ratio_median": statistics.median(ratios),
            "threads": threads, "rounds": rounds,
            # on a busy machine the fastest repetition is the least disturbed one
            "best_tok_s": {k: max(v) for k, v in samples.items()},
            "ratio_best": max(samples["meki"]) / max(samples["dense"])}


# --- main --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=240,
                    help="training steps per model: the time budget (240: about 25 min for both on 2 busy cores)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-mem", type=int, default=64)
    ap.add_argument("--d-ff", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout-tokens", type=int, default=32768, help="held-out tokens evaluated")
    ap.add_argument("--bench-rounds", type=int, default=9)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--install", action="store_true", help="copy the MeKi GGUF to meki_gguf/data/")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    tag = f"s{a.seed}-n{a.steps}-b{a.batch}-c{a.ctx}-L{a.layers}-d{a.d_model}-m{a.d_mem}-f{a.d_ff}-v{a.vocab}"
    run = out / tag
    run.mkdir(exist_ok=True)

    # 1. corpus
    html_root = fetch_corpus(out)
    docs_file = out / "docs.json"
    if not docs_file.is_file():
        docs_file.write_text(json.dumps(documents(html_root)))
    docs = json.loads(docs_file.read_text())
    train_docs, held_docs = split(docs, a.seed)
    deb = sorted((out / "corpus").glob(f"{PACKAGE}_*.deb"))[-1]
    log(f"corpus: {len(docs)} pages ({len(train_docs)} train, {len(held_docs)} held out), "
        f"{sum(len(t) for _, t in docs) / 1e6:.1f}M characters, from {deb.name}")

    # 2. tokenizer + token streams
    tok_dir = out / f"tokenizer-s{a.seed}-v{a.vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        tok_dir.mkdir(exist_ok=True)
        train_tokenizer([t for _, t in train_docs], tok_dir, a.vocab)
    tr_ids, he_ids = encode(tok_dir, train_docs), encode(tok_dir, held_docs)
    log(f"tokens: {len(tr_ids)} train, {len(he_ids)} held out")
    data = torch.from_numpy(tr_ids.astype(np.int64))
    held = torch.from_numpy(he_ids[: a.heldout_tokens + 1].astype(np.int64))

    # 3. train both on the same batches
    c = MekiConfig(vocab_size=a.vocab, n_layer=a.layers, d_model=a.d_model, d_mem=a.d_mem, d_ff=a.d_ff,
                   n_head=a.d_model // 64, n_kv_head=max(1, a.d_model // 128), head_dim=64,
                   rope_theta=500000.0, qk_norm=False, tied=True, dyn_norm=False, max_seq_len=4096)
    starts = batches(len(data), a.steps, a.batch, a.ctx, a.seed)
    res_file = run / "results.json"
    res = json.loads(res_file.read_text()) if res_file.is_file() else {}
    meki = init_for_training(c, a.seed)
    dense = dense_twin(meki)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for name, model in (("meki", meki), ("dense", dense)):
        ck = run / f"{name}.pt"
        if ck.is_file():
            model.load_state_dict(torch.load(ck, weights_only=True))
        else:
            res[name] = train(model, name, data, held, starts, a)
            res[name]["params"] = n_params(model)
            torch.save(model.state_dict(), ck)
            res_file.write_text(json.dumps(res, indent=1))
    meki.eval(), dense.eval()

    # 4. export
    from meki_gguf.checkpoint import load_checkpoint, save_hf
    from meki_gguf.write import write_gguf
    hf = run / "meki-demo"
    save_hf(meki, hf)
    for f in tok_dir.iterdir():
        shutil.copy(f, hf / f.name)
    meki_gguf = run / "meki-demo.gguf"
    write_gguf(load_checkpoint(hf), meki_gguf, outtype="f16", table_type="q8_0", tokenizer=tok_dir, progress=False)
    dense_gguf = write_dense_qwen2(dense.state_dict(), c, tok_dir, run / "dense-twin.gguf", "dense-twin")
    probe = he_ids[:200].astype(int).tolist()
    res["check_meki"] = check_gguf(meki_gguf, meki, probe)
    res["check_dense"] = check_gguf(dense_gguf, dense, probe)
    log(f"llama.cpp vs PyTorch: meki {res['check_meki']}, dense {res['check_dense']}")
    res["sizes_bytes"] = {"meki_gguf": meki_gguf.stat().st_size, "dense_gguf": dense_gguf.stat().st_size}
    res_file.write_text(json.dumps(res, indent=1))

    # 5. bench
    if not a.skip_bench:
        res["bench"] = bench({"meki": meki_gguf, "dense": dense_gguf}, a.bench_rounds, a.threads)
        log(f"decode: {res['bench']['median_tok_s']}, MeKi/dense {res['bench']['ratio_median']:.3f}; "
            f"fastest {res['bench']['best_tok_s']}, MeKi/dense {res['bench']['ratio_best']:.3f}")
    res["provenance"] = {
        "corpus": {"package": PACKAGE, "deb": deb.name, "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                   "license": LICENSE, "pages": len(docs), "train_pages": len(train_docs),
                   "heldout_pages": len(held_docs), "train_tokens": int(len(tr_ids)),
                   "heldout_tokens": int(len(he_ids)), "heldout_tokens_evaluated": int(len(held) - 1)},
        "tokenizer": f"byte-level BPE, {a.vocab} tokens (3 ChatML specials), Qwen2 pre-tokenizer, trained on the train split",
        "config": asdict(c), "seed": a.seed, "steps": a.steps, "batch": a.batch, "ctx": a.ctx,
        "training_tokens_per_model": a.steps * a.batch * a.ctx, "lr": a.lr, "weight_decay": a.weight_decay,
        "schedule": "AdamW (0.9, 0.95), 5% linear warm-up, cosine to 10%, grad clip 1.0",
        "command": " ".join(["scripts/train_demo.py"] + sys.argv[1:]),
    }
    res_file.write_text(json.dumps(res, indent=1))
    if a.install:
        data_dir = ROOT / "meki_gguf" / "data"
        data_dir.mkdir(exist_ok=True)
        shutil.copy(meki_gguf, data_dir / "meki-demo.gguf")
        prov = {k: v for k, v in res.items() if k != "bench"}
        for k in ("meki", "dense"):
            prov[k] = {kk: vv for kk, vv in res[k].items() if kk != "loss_curve"}
        if "bench" in res:
            prov["bench"] = res["bench"]
        (data_dir / "meki-demo.json").write_text(json.dumps(prov, indent=1) + "\n")
        log(f"installed {data_dir / 'meki-demo.gguf'}")
    print(table(res))


def table(res: dict) -> str:
    """The MeKi-vs-dense table of docs/TRAINED_DEMO.md."""
    p, c, b = res["provenance"], res["provenance"]["config"], res.get("bench")
    ram = res["dense"]["params"] + c["n_layer"] * (2 * c["d_model"] * c["d_mem"] + c["d_model"])
    rows = [("", "MeKi", "dense twin"),
            ("parameters (training form)", f"{res['meki']['params']:,}", f"{res['dense']['params']:,}"),
            ("weights in RAM at inference (table folded out)", f"{ram:,}", f"{res['dense']['params']:,}"),
            ("memory table (storage, token-major V x L*m)", f"{c['vocab_size'] * c['n_layer'] * c['d_mem']:,}", "-"),
            ("training tokens", f"{p['training_tokens_per_model']:,}", f"{p['training_tokens_per_model']:,}"),
            ("training wall time (s)", f"{res['meki']['train_wall_s']:.0f}", f"{res['dense']['train_wall_s']:.0f}"),
            ("final train loss (last 50 steps)", f"{res['meki']['final_train_loss']:.3f}",
             f"{res['dense']['final_train_loss']:.3f}"),
            ("held-out loss (nats/token)", f"{res['meki']['heldout_loss']:.4f}", f"{res['dense']['heldout_loss']:.4f}"),
            ("held-out perplexity (PyTorch, f32)", f"{res['meki']['heldout_ppl']:.2f}", f"{res['dense']['heldout_ppl']:.2f}"),
            ("GGUF", f"f16 + q8_0 table, {res['sizes_bytes']['meki_gguf'] / 1e6:.1f} MB",
             f"f16 `qwen2`, {res['sizes_bytes']['dense_gguf'] / 1e6:.1f} MB"),
            ("llama.cpp vs PyTorch: top-1 / mean KL", f"{res['check_meki']['top1']:.3f} / {res['check_meki']['mean_kl']:.1e}",
             f"{res['check_dense']['top1']:.3f} / {res['check_dense']['mean_kl']:.1e}")]
    if b:
        rows.append((f"decode tg128 tok/s (llama-bench, {b['threads']} threads, median of {b['rounds']} rounds)",
                     f"{b['median_tok_s']['meki']:.1f}", f"{b['median_tok_s']['dense']:.1f}"))
        rows.append(("decode ratio MeKi / dense (median of per-round ratios)", f"{b['ratio_median']:.3f}", ""))
        if "best_tok_s" in b:
            rows.append(("decode tg128 tok/s, fastest repetition", f"{b['best_tok_s']['meki']:.1f}",
                         f"{b['best_tok_s']['dense']:.1f}"))
            rows.append(("decode ratio MeKi / dense (fastest repetitions)", f"{b['ratio_best']:.3f}", ""))
    lines = [f"| {a} | {m} | {d} |" for a, m, d in rows]
    lines.insert(1, "|---|---|---|")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
