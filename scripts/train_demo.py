#!/usr/bin/env python3
"""Train the embedded demo model: a small MeKi model and its dense twin on the Python documentation,
as text and as questions with their answers.

    .venv/bin/python scripts/train_demo.py [--steps N] [--seed S] [--out build/demo] [--install]

Stages (each cached under --out, so a rerun only redoes what is missing, and an interrupted
training resumes from its last checkpoint):
1. corpus (scripts/demo_corpus.py): the Debian package python3.11-doc (the Python 3.11
   documentation, HTML; PSF License), its pages as text and its questions and answers as ChatML
   conversations (the FAQ, the sections of the tutorial, HOWTOs and references, every documented
   function, class and attribute, the glossary). Split by page: a page is held out when
   sha256(seed:path) falls in the held-out fraction (5%), and with it the questions made from it.
2. tokenizer: a byte-level BPE (vocabulary 4096 including 3 ChatML specials) trained with the
   `tokenizers` library on the training pages, with Qwen2's pre-tokenizer (llama.cpp pre "qwen2")
   and a ChatML chat template, exactly the recipe of meki_gguf.tokenizer.tiny_tokenizer_dir.
3. train: MeKi (training form: static table + dynamic projection; G without an input norm, as in
   the local spec, dyn_norm=False) and its dense twin (the same backbone, the same initial backbone
   weights, without the memory branch) on the same batches (same token stream, steps and seed);
   AdamW, linear warm-up then cosine decay. Both are evaluated at the same steps (--eval-every):
   held-out loss on the held-out pages and answer loss on the held-out questions, in PyTorch
   (float32). A checkpoint at each evaluation (model, optimizer, history) makes the run resumable.
4. export: MeKi -> save_hf -> write_gguf (f16 backbone, q8_0 table, the trained tokenizer); the
   dense twin -> a stock llama.cpp `qwen2` GGUF (f16; qwen2 = no QK-norm, rotate-half RoPE, its
   q/k/v biases optional: the same math). Both are checked against PyTorch through llama.cpp.
5. answers: both GGUFs answer held-out questions through llama.cpp's chat handling (the file's
   template, <|im_end|> ends a reply), with the demo's sampling (meki_gguf.demo.CHAT_SAMPLING).
6. bench: decode speed of both in the patched llama-bench (-p 0 -n 128 -r 3), interleaved rounds.
Results: <out>/<run>/results.json and curve.png; --install copies the MeKi GGUF to
meki_gguf/data/meki-demo.gguf with meki_gguf/data/meki-demo.json (its provenance) and the curve to
docs/demo-curve.png.

Deterministic given --seed (and the thread count: float summation order), on CPU; a resumed run
gives the same files as an uninterrupted one; --no-twin trains, exports and checks MeKi alone (half
the time), enough to check that a run reproduces the embedded file. --device cuda runs the same
recipe on a GPU (not bit-identical to the CPU's).
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import asdict
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from demo_corpus import (LICENSE, PACKAGE, chat_prompt, chat_turn, deb_file, documents,  # noqa: E402
                         fetch_corpus, qa_pairs, split)
from meki_gguf.demo import CHAT_PROMPT, CHAT_SAMPLING  # noqa: E402
from meki_gguf.atomic import replace_atomically  # noqa: E402
from meki_gguf.model import MekiConfig, MekiForCausalLM  # noqa: E402


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def cached_json(path: Path, make):
    if not path.is_file():
        data = json.dumps(make())
        replace_atomically(path, lambda tmp: tmp.write_text(data))
    return json.loads(path.read_text())


# --- 2. tokenizer ------------------------------------------------------------------------------

def tokenizer(tok_dir: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def encode(tok, texts: list[str]) -> np.ndarray:
    """The texts as one stream, each followed by <|endoftext|> (uint16). The ChatML specials in a
    text are single tokens."""
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


def encode_qa(tok, pairs, ctx: int) -> list[tuple[list[int], list[int]]]:
    """Held-out questions: (prompt ids, answer ids ending with <|im_end|>), cut to fit ctx."""
    end = tok.token_to_id("<|im_end|>")
    out = []
    for _, q, a, _ in pairs:
        p = tok.encode(chat_prompt(q), add_special_tokens=False).ids
        ans = tok.encode(a, add_special_tokens=False).ids + [end]
        out.append((p, ans[: ctx + 1 - len(p)]))
    return out


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
    """Mean loss (nats/token) on the held-out pages' stream, in ctx-token windows."""
    n = (len(held) - 1) // ctx
    x = held[: n * ctx].view(n, ctx).to(model_device(model))
    y = held[1: n * ctx + 1].view(n, ctx).to(model_device(model))
    tot = 0.0
    for i in range(0, n, bs):
        logits = model(x[i:i + bs]).logits
        tot += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + bs].flatten(), reduction="sum").item()
    return tot / (n * ctx)


@torch.no_grad()
def answer_loss(model, qa: list[tuple[list[int], list[int]]], bs: int = 32) -> float:
    """Mean loss (nats/token) of the held-out answers (and their <|im_end|>) given their questions."""
    tot, count = 0.0, 0
    for i in range(0, len(qa), bs):
        chunk = qa[i:i + bs]
        n = max(len(p) + len(a) for p, a in chunk) - 1
        x = torch.zeros(len(chunk), n, dtype=torch.long)
        y = torch.full((len(chunk), n), -100, dtype=torch.long)       # only the answers are scored
        for r, (p, a) in enumerate(chunk):
            seq = p + a
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, len(p) - 1:len(seq) - 1] = torch.tensor(a)
        logits = model(x.to(model_device(model))).logits
        tot += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(logits.device).flatten(),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    return tot / count


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def evaluate(model, held: torch.Tensor, qa, ctx: int) -> dict:
    model.eval()
    r = {"heldout_loss": heldout_loss(model, held, ctx), "answer_loss": answer_loss(model, qa)}
    model.train()
    return r


def save_atomic(obj, path: Path):
    def write(tmp: Path):
        # through a file object: given a path, torch names the archive's members after it (the
        # temp file's random name), and two saves of the same weights would differ in bytes
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    replace_atomically(path, write)


def train(model, name: str, data: torch.Tensor, starts: torch.Tensor, held: torch.Tensor, qa, a, run: Path) -> dict:
    """Train `model` on the batches `starts`, evaluating it every a.eval_every steps; resumes from
    run/<name>.train.pt, written at each evaluation."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n and "memory" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed_tokens" not in n and "memory" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=True)
    steps, bsz, ctx = starts.shape[0], starts.shape[1], a.ctx
    offs = torch.arange(ctx + 1)
    warmup = max(1, steps // 20)
    ck = run / f"{name}.train.pt"
    state = {"step": 0, "hist": [], "evals": [], "wall": 0.0}
    if ck.is_file():
        saved = torch.load(ck, weights_only=True)
        model.load_state_dict(saved.pop("model"))
        opt.load_state_dict(saved.pop("opt"))
        state = saved
        log(f"{name}: resuming at step {state['step']}/{steps} from {ck}")
    if state["step"] == 0 and not state["evals"]:
        state["evals"].append({"step": 0, "tokens": 0, **evaluate(model, held, qa, ctx)})
        log(f"{name} at initialisation: held-out {state['evals'][0]['heldout_loss']:.4f}, "
            f"answers {state['evals'][0]['answer_loss']:.4f}")
    model.train()
    t0, first = time.time() - state["wall"], state["step"]
    t_session = time.time()
    hist = state["hist"]
    for step in range(state["step"], steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, a.lr, warmup)
        seq = data[starts[step][:, None] + offs].to(model_device(model))
        logits = model(seq[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == steps:
            rate = (done - first) * bsz * ctx / max(time.time() - t_session, 1e-9)
            log(f"{name} step {done}/{steps} loss {statistics.fmean(hist[-50:]):.3f} "
                f"({time.time() - t0:.0f}s, {rate:.0f} tok/s)")
        if done % a.eval_every == 0 or done == steps:
            ev = {"step": done, "tokens": done * bsz * ctx, **evaluate(model, held, qa, ctx)}
            state["evals"].append(ev)
            log(f"{name} eval at {ev['tokens'] / 1e6:.2f}M tokens: held-out {ev['heldout_loss']:.4f} "
                f"(ppl {math.exp(ev['heldout_loss']):.2f}), answers {ev['answer_loss']:.4f}")
            state.update(step=done, hist=hist, wall=time.time() - t0)
            save_atomic({**state, "model": model.state_dict(), "opt": opt.state_dict()}, ck)
    last = state["evals"][-1]
    log(f"{name}: held-out loss {last['heldout_loss']:.4f}, perplexity {math.exp(last['heldout_loss']):.2f}, "
        f"answer loss {last['answer_loss']:.4f} ({state['wall']:.0f}s of training)")
    return {"heldout_loss": last["heldout_loss"], "heldout_ppl": math.exp(last["heldout_loss"]),
            "answer_loss": last["answer_loss"], "train_wall_s": state["wall"],
            "final_train_loss": statistics.fmean(hist[-50:]), "loss_curve": hist[::10], "evals": state["evals"]}


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


# --- 5. answers --------------------------------------------------------------------------------

@torch.no_grad()
def stop_probability(model, qa: list[tuple[list[int], list[int]]], ctx: int) -> dict:
    """Does the model end its turn where the documentation's answer ends? The mean probability of
    <|im_end|> right after each whole held-out answer, and inside the answers (teacher-forced)."""
    at_end, inside = [], []
    for p, a in qa:
        if len(p) + len(a) > ctx:
            continue
        logits = model(torch.tensor([p + a[:-1]], device=model_device(model))).logits[0, len(p) - 1:]
        probs = torch.softmax(logits.double(), -1)[:, a[-1]]
        at_end.append(probs[-1].item())
        inside.append(probs[:-1].mean().item())
    return {"at_end": statistics.fmean(at_end), "inside": statistics.fmean(inside)}


def pick_questions(pairs, n: int) -> list[tuple[str, str, str, str]]:
    """n held-out questions, in a fixed order (by hash), taking the kinds in turn."""
    by_kind: dict[str, list] = {}
    for qa in sorted(pairs, key=lambda x: hashlib.sha256(x[1].encode()).hexdigest()):
        by_kind.setdefault(qa[3], []).append(qa)
    out, kinds = [], [k for k in ("faq", "section", "api", "glossary") if k in by_kind]
    while len(out) < n and any(by_kind[k] for k in kinds):
        for k in kinds:
            if by_kind[k] and len(out) < n:
                out.append(by_kind[k].pop(0))
    return out


def answers(path: Path, questions, max_tokens: int) -> list[dict]:
    """The file's replies through llama.cpp's chat handling, with the demo's sampling."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, verbose=False)
    out = []
    for page, q, ref, kind in questions:
        r = llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=max_tokens, **CHAT_SAMPLING)
        out.append({"page": page, "kind": kind, "question": q, "reply": r["choices"][0]["message"]["content"],
                    "finish_reason": r["choices"][0]["finish_reason"], "reference": ref})
    del llm
    return out


def plot(res: dict, path: Path):
    """Held-out loss and answer loss of both models against training tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "heldout_loss", "held-out pages"), (axes[1], "answer_loss", "held-out questions: answer tokens")):
        for name, style in (("meki", "o-"), ("dense", "s--")):
            ev = [e for e in res[name]["evals"] if e["step"] > 0]
            ax.plot([e["tokens"] / 1e6 for e in ev], [e[key] for e in ev], style,
                    label="MeKi" if name == "meki" else "dense twin")
        ax.set_xlabel("training tokens per model (M)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5000,
                    help="training steps per model: the budget (each model sees steps x batch x ctx tokens)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-mem", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=768)
    ap.add_argument("--no-qa", dest="qa", action="store_false",
                    help="train on the pages alone, without the questions and answers (the first demo's recipe)")
    ap.add_argument("--eval-every", type=int, default=500, help="steps between evaluations (and checkpoints)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device: cpu, or cuda on a GPU machine")
    ap.add_argument("--heldout-tokens", type=int, default=32768, help="held-out tokens evaluated")
    ap.add_argument("--answers", type=int, default=5, help="held-out questions each model answers in llama.cpp")
    ap.add_argument("--bench-rounds", type=int, default=9)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--train-only", action="store_true", help="stop after training (no GGUF, no llama.cpp)")
    ap.add_argument("--no-twin", dest="twin", action="store_false",
                    help="MeKi alone: train it, export meki-demo.gguf, check it against PyTorch and stop "
                         "(half the time; enough to check that a run reproduces the embedded file)")
    ap.add_argument("--install", action="store_true",
                    help="copy the MeKi GGUF and its provenance to meki_gguf/data/, the curve to docs/")
    a = ap.parse_args()
    if a.install and not a.twin:
        ap.error("--install needs the dense twin: meki-demo.json carries both perplexities")
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    tag = (f"s{a.seed}-n{a.steps}-b{a.batch}-c{a.ctx}-L{a.layers}-d{a.d_model}-m{a.d_mem}-f{a.d_ff}-v{a.vocab}"
           + ("-qa" if a.qa else ""))
    run = out / tag
    run.mkdir(exist_ok=True)

    # 1. corpus: pages, questions and answers, split by page
    html_root = fetch_corpus(out)
    docs = cached_json(out / "docs.json", lambda: documents(html_root))
    pairs = cached_json(out / "qa.json", lambda: qa_pairs(html_root))
    train_docs, held_docs = split(docs, a.seed)
    train_qa, held_qa = split(pairs, a.seed)
    deb = deb_file(out)
    log(f"corpus: {len(docs)} pages ({len(train_docs)} train, {len(held_docs)} held out), "
        f"{sum(len(t) for _, t in docs) / 1e6:.1f}M characters, from {deb.name}; "
        f"{len(pairs)} questions ({len(train_qa)} train, {len(held_qa)} held out)")

    # 2. tokenizer (trained on the training pages) + token streams
    tok_dir = out / f"tokenizer-s{a.seed}-v{a.vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        tok_dir.mkdir(exist_ok=True)
        from meki_gguf.tokenizer import train_bpe_dir
        train_bpe_dir([t for _, t in train_docs], tok_dir, a.vocab)
    tok = tokenizer(tok_dir)
    tr_ids, he_ids = encode(tok, [t for _, t in train_docs]), encode(tok, [t for _, t in held_docs])
    qa_ids = encode(tok, [chat_turn(q, ans) for _, q, ans, _ in train_qa]) if a.qa else np.zeros(0, np.uint16)
    held_qa_ids = encode_qa(tok, held_qa, a.ctx)
    log(f"tokens: {len(tr_ids)} train pages + {len(qa_ids)} train conversations, {len(he_ids)} held-out pages, "
        f"{sum(len(x) for _, x in held_qa_ids)} held-out answer tokens")
    data = torch.from_numpy(np.concatenate([tr_ids, qa_ids]).astype(np.int64))
    held = torch.from_numpy(he_ids[: a.heldout_tokens + 1].astype(np.int64))

    # 3. train both on the same batches
    c = MekiConfig(vocab_size=a.vocab, n_layer=a.layers, d_model=a.d_model, d_mem=a.d_mem, d_ff=a.d_ff,
                   n_head=a.d_model // 64, n_kv_head=max(1, a.d_model // 128), head_dim=64,
                   rope_theta=500000.0, qk_norm=False, tied=True, dyn_norm=False,
                   max_seq_len=a.ctx)   # the trained context: llama.cpp's default n_ctx, where chat starts over
    starts = batches(len(data), a.steps, a.batch, a.ctx, a.seed)
    res_file = run / "results.json"
    res = json.loads(res_file.read_text()) if res_file.is_file() else {}
    meki = init_for_training(c, a.seed)
    dense = dense_twin(meki)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for name, model in (("meki", meki), ("dense", dense))[: 2 if a.twin else 1]:
        ck = run / f"{name}.pt"
        if ck.is_file():
            model.load_state_dict(torch.load(ck, weights_only=True))
        else:
            model.to(a.device)
            res[name] = train(model, name, data, starts, held, held_qa_ids, a, run)
            res[name]["params"] = n_params(model)
            model.cpu()
            save_atomic(model.state_dict(), ck)
            res_file.write_text(json.dumps(res, indent=1))
    meki.eval(), dense.eval()
    if a.twin:
        plot(res, run / "curve.png")
    if a.train_only:
        return

    # 4. export
    from meki_gguf.checkpoint import load_checkpoint, save_hf
    from meki_gguf.write import write_gguf
    hf = run / "meki-demo"
    save_hf(meki, hf)
    for f in tok_dir.iterdir():
        shutil.copy(f, hf / f.name)
    meki_gguf = run / "meki-demo.gguf"
    write_gguf(load_checkpoint(hf), meki_gguf, outtype="f16", table_type="q8_0", tokenizer=tok_dir, progress=False)
    probe = he_ids[:200].astype(int).tolist()
    res["check_meki"] = check_gguf(meki_gguf, meki, probe)
    if not a.twin:
        res["sha256"] = {"meki_gguf": hashlib.sha256(meki_gguf.read_bytes()).hexdigest()}
        res_file.write_text(json.dumps(res, indent=1))
        log(f"llama.cpp vs PyTorch: meki {res['check_meki']}; {meki_gguf}: sha256 {res['sha256']['meki_gguf']}")
        return
    dense_gguf = write_dense_qwen2(dense.state_dict(), c, tok_dir, run / "dense-twin.gguf", "dense-twin")
    res["check_dense"] = check_gguf(dense_gguf, dense, probe)
    log(f"llama.cpp vs PyTorch: meki {res['check_meki']}, dense {res['check_dense']}")
    res["sizes_bytes"] = {"meki_gguf": meki_gguf.stat().st_size, "dense_gguf": dense_gguf.stat().st_size}
    res["sha256"] = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in (("meki_gguf", meki_gguf), ("dense_gguf", dense_gguf))}

    # 5. answers to held-out questions; the demo's question is none of the training questions
    questions = pick_questions(held_qa, a.answers)
    res["answers"] = {"sampling": CHAT_SAMPLING, "max_tokens": 200,
                      "meki": answers(meki_gguf, questions, 200), "dense": answers(dense_gguf, questions, 200)}
    res["demo_question"] = {"question": CHAT_PROMPT, "a_training_question": CHAT_PROMPT in {q for _, q, _, _ in train_qa},
                            "meki": answers(meki_gguf, [("-", CHAT_PROMPT, "", "-")], 256)[0]}
    examples = pick_questions(held_qa, 16)          # for tests/test_demo_model.py: does it end its turns?
    res["heldout_examples"] = [{"question": q, "answer": ans} for _, q, ans, _ in examples]
    ex_ids = encode_qa(tok, examples, a.ctx)
    res["stop_probability"] = {"meki": stop_probability(meki, ex_ids, a.ctx), "dense": stop_probability(dense, ex_ids, a.ctx)}
    log(f"P(<|im_end|>) after held-out answers: {res['stop_probability']}; the demo's question "
        f"{'IS' if res['demo_question']['a_training_question'] else 'is not'} a training question")
    res_file.write_text(json.dumps(res, indent=1))

    # 6. bench
    if not a.skip_bench:
        res["bench"] = bench({"meki": meki_gguf, "dense": dense_gguf}, a.bench_rounds, a.threads)
        log(f"decode: {res['bench']['median_tok_s']}, MeKi/dense {res['bench']['ratio_median']:.3f}; "
            f"fastest {res['bench']['best_tok_s']}, MeKi/dense {res['bench']['ratio_best']:.3f}")
    res["provenance"] = {
        "corpus": {"package": PACKAGE, "deb": deb.name, "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                   "license": LICENSE, "pages": len(docs), "train_pages": len(train_docs),
                   "heldout_pages": len(held_docs), "train_tokens": int(len(tr_ids)),
                   "heldout_tokens": int(len(he_ids)), "heldout_tokens_evaluated": int(len(held) - 1),
                   "questions": len(pairs), "train_questions": len(train_qa), "heldout_questions": len(held_qa),
                   "train_conversation_tokens": int(len(qa_ids)),
                   "heldout_answer_tokens": int(sum(len(x) for _, x in held_qa_ids))},
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
        prov = {k: v for k, v in res.items() if k not in ("bench", "answers")}
        for k in ("meki", "dense"):
            prov[k] = {kk: vv for kk, vv in res[k].items() if kk != "loss_curve"}
        if "bench" in res:
            prov["bench"] = res["bench"]
        (data_dir / "meki-demo.json").write_text(json.dumps(prov, indent=1) + "\n")
        shutil.copy(run / "curve.png", ROOT / "docs" / "demo-curve.png")
        log(f"installed {data_dir / 'meki-demo.gguf'}")
    print(table(res))
    print(curve_table(res))
    print(answers_md(res))


def curve_table(res: dict) -> str:
    """Held-out loss and answer loss of both models at every evaluation (equal tokens)."""
    lines = ["| training tokens (M) | MeKi held-out loss (ppl) | dense held-out loss (ppl) | MeKi answer loss | dense answer loss |",
             "|---:|---:|---:|---:|---:|"]
    for m, d in zip(res["meki"]["evals"], res["dense"]["evals"]):
        lines.append(f"| {m['tokens'] / 1e6:.2f} | {m['heldout_loss']:.4f} ({math.exp(m['heldout_loss']):.1f}) | "
                     f"{d['heldout_loss']:.4f} ({math.exp(d['heldout_loss']):.1f}) | {m['answer_loss']:.4f} | {d['answer_loss']:.4f} |")
    return "\n".join(lines)


def answers_md(res: dict) -> str:
    """The held-out questions and both models' replies, unedited."""
    out = [f"Sampling: {res['answers']['sampling']}, at most {res['answers']['max_tokens']} tokens.", ""]
    for m, d in zip(res["answers"]["meki"], res["answers"]["dense"]):
        out += [f"**{m['question']}** ({m['kind']}, held-out page `{m['page']}`)", "",
                f"- MeKi ({'ended with <|im_end|>' if m['finish_reason'] == 'stop' else 'token limit'}):", "",
                *["  > " + ln for ln in m["reply"].splitlines() or [""]], "",
                f"- dense twin ({'ended with <|im_end|>' if d['finish_reason'] == 'stop' else 'token limit'}):", "",
                *["  > " + ln for ln in d["reply"].splitlines() or [""]], ""]
    return "\n".join(out)


def table(res: dict) -> str:
    """The MeKi-vs-dense table of docs/TRAINED_DEMO.md."""
    p, c, b = res["provenance"], res["provenance"]["config"], res.get("bench")
    ram = res["dense"]["params"] + c["n_layer"] * (2 * c["d_model"] * c["d_mem"] + c["d_model"])
    m, d = res["meki"], res["dense"]
    rows = [("", "MeKi", "dense twin"),
            ("parameters (training form)", f"{m['params']:,}", f"{d['params']:,}"),
            ("weights in RAM at inference (table folded out)", f"{ram:,}", f"{d['params']:,}"),
            ("memory table (storage, token-major V x L*m)", f"{c['vocab_size'] * c['n_layer'] * c['d_mem']:,}", "-"),
            ("training tokens", f"{p['training_tokens_per_model']:,}", f"{p['training_tokens_per_model']:,}"),
            ("training wall time (s)", f"{m['train_wall_s']:.0f}", f"{d['train_wall_s']:.0f}"),
            ("final train loss (last 50 steps)", f"{m['final_train_loss']:.3f}", f"{d['final_train_loss']:.3f}"),
            ("held-out loss (nats/token)", f"{m['heldout_loss']:.4f}", f"{d['heldout_loss']:.4f}"),
            ("**held-out perplexity** (PyTorch, f32)", f"**{m['heldout_ppl']:.2f}**", f"**{d['heldout_ppl']:.2f}**"),
            ("answer loss, held-out questions (nats/token)", f"{m['answer_loss']:.4f}", f"{d['answer_loss']:.4f}"),
            ("P(<\\|im_end\\|>) after a whole held-out answer / inside the answers (mean over the held-out examples that fit the context)",
             *(f"{res['stop_probability'][k]['at_end']:.3f} / {res['stop_probability'][k]['inside']:.4f}" for k in ("meki", "dense"))),
            ("GGUF", f"f16 + q8_0 table, {res['sizes_bytes']['meki_gguf'] / 1e6:.1f} MB",
             f"f16 `qwen2`, {res['sizes_bytes']['dense_gguf'] / 1e6:.1f} MB"),
            ("llama.cpp vs PyTorch: top-1 / mean KL", f"{res['check_meki']['top1']:.3f} / {res['check_meki']['mean_kl']:.1e}",
             f"{res['check_dense']['top1']:.3f} / {res['check_dense']['mean_kl']:.1e}")]
    if b:
        rows.append((f"decode tg128 tok/s (llama-bench, {b['threads']} threads, median of {b['rounds']} rounds)",
                     f"{b['median_tok_s']['meki']:.1f}", f"{b['median_tok_s']['dense']:.1f}"))
        rows.append(("decode ratio MeKi / dense (median of per-round ratios)", f"{b['ratio_median']:.3f}", ""))
    lines = [f"| {x} | {y} | {z} |" for x, y, z in rows]
    lines.insert(1, "|---|---|---|")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
