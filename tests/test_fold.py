"""The fold (llama.cpp's conversion/meki.py, re-exported by meki_gguf/fold.py): the folded table
reproduces the training form exactly, for both gate variants; the streaming fold equals the
per-layer expert vectors of the reference; a folded model gives the same logits."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from meki_gguf.fold import fold_chunks
from meki_gguf.model import MekiConfig, MekiForCausalLM, init_random

TINY = MekiConfig(vocab_size=300, n_layer=3, d_model=64, d_mem=32, d_ff=96, n_head=4, n_kv_head=2, head_dim=16)
VARIANTS = [pytest.param(False, id="local"), pytest.param(True, id="te")]


def _reference_tables(sd: dict, c: MekiConfig) -> torch.Tensor:
    """[V, L*m] token-major: each layer's training-form expert vector of every token, float64."""
    model = MekiForCausalLM(c).double()
    model.load_state_dict({k: v.double() for k, v in sd.items()})
    E, ids = model.model.embed_tokens.weight, torch.arange(c.vocab_size)
    with torch.no_grad():
        return torch.cat([blk.meki.expert(ids, E) for blk in model.model.layers], dim=1)


@pytest.mark.parametrize("dyn_norm", VARIANTS)
@pytest.mark.parametrize("qk_norm,tied", [(False, True), (True, False)])
def test_folded_model_gives_the_same_logits(dyn_norm, qk_norm, tied):
    c = replace(TINY, dyn_norm=dyn_norm, qk_norm=qk_norm, tied=tied)
    model = init_random(c, seed=4, dtype=torch.float64)
    assert all(blk.meki.alpha.item() != 1 and blk.meki.beta.item() != 1 for blk in model.model.layers)  # a wrong fold shows
    ids = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        model.fold()
        after = model(ids).logits
    assert model.config.folded and not c.folded                          # the shared config is left alone
    assert all(blk.meki.table is not None and not hasattr(blk.meki, "memory") for blk in model.model.layers)
    assert "model.layers.0.meki.table" in model.state_dict()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dyn_norm", VARIANTS)
def test_streaming_fold_equals_the_training_form(dyn_norm):
    c = replace(TINY, dyn_norm=dyn_norm)
    sd = {k: v.to(torch.bfloat16) for k, v in init_random(c, seed=5).state_dict().items()}  # checkpoint dtype
    want = _reference_tables(sd, c)

    chunks = list(fold_chunks(c, sd, chunk=77, dtype=torch.float64))
    assert [len(x) for x in chunks] == [77, 77, 77, 69]
    got = torch.cat(chunks)
    assert got.dtype == torch.float64 and got.shape == (c.vocab_size, c.n_layer * c.d_mem)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    f32 = torch.cat(list(fold_chunks(c, sd)))                                 # the converter's default
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), want, rtol=1e-5, atol=1e-5)


def test_folded_checkpoint_streams_its_tables():
    c = TINY
    model = init_random(c, seed=7, dtype=torch.float64)
    want = torch.cat(list(fold_chunks(c, model.state_dict(), dtype=torch.float64)))
    model.fold()
    got = torch.cat(list(fold_chunks(model.config, model.state_dict(), chunk=100, dtype=torch.float64)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_streaming_fold_leaves_the_checkpoint_alone():
    c = TINY
    sd = init_random(c, seed=6).state_dict()
    copy = {k: v.clone() for k, v in sd.items()}
    for _ in fold_chunks(c, sd, chunk=100):
        pass
    assert all(torch.equal(sd[k], copy[k]) for k in sd)
