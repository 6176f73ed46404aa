"""Small MeKi models for the runtime and server tests: official Megatron-LM layout checkpoints
(checkpoint.save_megatron), converted by write_gguf with a small real BPE tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from meki_gguf.checkpoint import Checkpoint, load_checkpoint, save_megatron
from meki_gguf.model import MekiConfig, MekiForCausalLM, init_random
from meki_gguf.tokenizer import _CORPUS, tiny_tokenizer_dir
from meki_gguf.write import write_gguf

N_TOK = 320                      # the tiny tokenizer's tokens; the models pad them to 384 rows
# every row length a multiple of 32, so that q8_0 fits the table (m) and the backbone
TINY = MekiConfig(vocab_size=384, n_layer=2, d_model=64, d_mem=32, d_ff=128, n_head=4, n_kv_head=2,
                  head_dim=16, max_seq_len=1024)


def tokenizer(root: Path) -> Path:
    return tiny_tokenizer_dir(root, n_tokens=N_TOK)


def corpus_ids(tok: Path) -> list[int]:
    """The tiny tokenizer's own training text, tokenized: what the test models learn."""
    return Tokenizer.from_file(str(tok / "tokenizer.json")).encode(_CORPUS).ids


def train(model: MekiForCausalLM, ids: list[int], steps: int = 30, batch: int = 16, T: int = 64) -> float:
    """A few Adam steps on `ids`, so that the model predicts like a language model does: with
    peaked next-token distributions. A random model's are flat, and their near-ties make the
    argmax flip under any rounding (top-1 of a random model with a q8_0 table: ~98.8%)."""
    g = torch.Generator().manual_seed(0)
    data = torch.tensor(ids)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # ops this small only lose from threads, badly on a busy machine
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(data) - T - 1, (batch,), generator=g)
            x = torch.stack([data[s:s + T + 1] for s in starts])
            loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return float(loss.detach())


def build(root: Path, tok: Path, c: MekiConfig = TINY, types=(("f32", "f32"),), trained: bool = True,
          seed: int = 0) -> tuple[Checkpoint, dict[tuple[str, str], Path]]:
    """Model -> official-layout checkpoint (f32) -> one GGUF per (outtype, table_type)."""
    root.mkdir(parents=True, exist_ok=True)
    model = init_random(c, seed=seed)
    if trained:
        train(model, corpus_ids(tok))
    save_megatron(model, root / "megatron", dtype=torch.float32)
    ckpt = load_checkpoint(root / "megatron")
    return ckpt, {(o, t): write_gguf(ckpt, root / f"{o}-{t}.gguf", outtype=o, table_type=t, tokenizer=tok,
                                     progress=False) for o, t in types}
