"""The demo models.

- The embedded default (`EMBEDDED`, shipped in meki_gguf/data/): a small MeKi model trained on
  the Python documentation by scripts/train_demo.py (docs/TRAINED_DEMO.md), folded, q8_0 table.
  `meki-gguf chat` with no model and the end of `meki-gguf demo` use it.
- The pipeline check (`build()`): a small MeKi checkpoint built on the spot in the official
  Megatron-LM layout, converted, and compared with the PyTorch reference. It is built once into the
cache folder (`$MEKI_GGUF_CACHE`, else `$XDG_CACHE_HOME/meki-gguf`, else `~/.cache/meki-gguf`),
deterministically: random weights (model.init_random, seed 0), written in the official
Megatron-LM layout (checkpoint.save_megatron, Transformer Engine variant as in the released
training script), converted by write_gguf with a small real BPE tokenizer and chat template.
Its weights are random: it shows the pipeline, and the trained model shows the text.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# The released MeKi training script's shape in miniature: the Transformer Engine spec (so G_l has
# its input norm), tied embeddings, no QK-norm; the tiny tokenizer's 320 tokens padded to 384 rows
# like Megatron. (A MekiConfig's fields: this module loads without torch, for `chat`.)
CONFIG = dict(vocab_size=384, n_layer=4, d_model=128, d_mem=64, d_ff=384, n_head=4, n_kv_head=2,
              head_dim=32, qk_norm=False, tied=True, dyn_norm=True, max_seq_len=2048)
N_TOKENS = 320
SEED = 0
PROMPT = "Once upon a time, a small model kept its memory on disk."
NAME = "meki-demo-random-2.gguf"     # bump the name when CONFIG or the recipe changes
EMBEDDED = Path(__file__).parent / "data" / "meki-demo.gguf"   # regenerate: scripts/train_demo.py --install
PROVENANCE = EMBEDDED.with_suffix(".json")
# a question the embedded model did not train on (no training conversation asks it; scripts/train_demo.py
# checks), about pages it did train on (the tutorial's "Reading and Writing Files")
CHAT_PROMPT = "How do I read a file line by line?"
# the demo's chat turn and the held-out answers in docs/TRAINED_DEMO.md (scripts/train_demo.py)
CHAT_SAMPLING = dict(temperature=0.7, top_p=0.9, repeat_penalty=1.1, seed=1)


def embedded_summary() -> str:
    """The embedded model's measured quality beside its dense twin's, from its provenance."""
    import json
    try:
        p = json.loads(PROVENANCE.read_text())
        tokens = p["provenance"]["training_tokens_per_model"]
        return (f"trained on {tokens / 1e6:.1f}M tokens of the Python documentation; held-out perplexity "
                f"{p['meki']['heldout_ppl']:.1f}, its dense twin's {p['dense']['heldout_ppl']:.1f} (docs/TRAINED_DEMO.md)")
    except (OSError, KeyError, ValueError):
        return ""


def cache_dir() -> Path:
    if os.environ.get("MEKI_GGUF_CACHE"):
        return Path(os.environ["MEKI_GGUF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meki-gguf"


def demo_dir() -> Path:
    return cache_dir() / "demo"


def default_model(log=print) -> Path:
    """The model `chat` uses when none is given: the one place to change it."""
    if EMBEDDED.is_file():
        return EMBEDDED
    log(f"{EMBEDDED} is missing (run scripts/train_demo.py --install); using the random demo model")
    return build(log)


def checkpoint_dir() -> Path:
    return demo_dir() / "megatron"


def build(log=print) -> Path:
    """Build the demo checkpoint and its GGUF (f32 everywhere: the parity shown is exact),
    unless already there. The folder appears complete or not at all."""
    import torch

    from .checkpoint import load_checkpoint, save_megatron
    from .model import MekiConfig, init_random
    from .tokenizer import tiny_tokenizer_dir
    from .write import write_gguf

    out = demo_dir()
    if (out / NAME).is_file() and checkpoint_dir().is_dir():
        return out / NAME
    log(f"building the demo model in {out} (once) ...")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    try:
        tok = tiny_tokenizer_dir(tmp / "tokenizer", n_tokens=N_TOKENS)
        save_megatron(init_random(MekiConfig(**CONFIG), seed=SEED), tmp / "megatron", dtype=torch.bfloat16)
        write_gguf(load_checkpoint(tmp / "megatron"), tmp / NAME, outtype="f32", table_type="f32",
                   tokenizer=tok, progress=False)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / NAME
