"""The fold (meki_gguf/fold.py): the folded table reproduces the training form exactly, for
both gate variants, and the converter's streaming fold equals the per-layer fold."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from meki_gguf.fold import fold_chunks, fold_layer
from meki_gguf.model import MekiConfig, MekiForCausalLM, init_random

TINY = MekiConfig(vocab_size=300, n_layer=3, d_model=64, d_mem=32, d_ff=96, n_head=4, n_kv_head=2, head_dim=16)
VARIANTS = [pytest.param(False, id="paper"), pytest.param(True, id="megatron-te")]


@pytest.mark.parametrize("gate_on_residual", VARIANTS)
def test_fold_layer_is_the_training_form(gate_on_residual):
    c = replace(TINY, gate_on_residual=gate_on_residual)
    model = init_random(c, seed=3, dtype=torch.float64)
    E = model.model.embed_tokens.weight
    for blk in model.model.layers:
        br = blk.meki
        assert br.alpha.item() != 1 and br.beta.item() != 1                  # a wrong fold shows
        with torch.no_grad():
            want = br.expert(torch.arange(c.vocab_size), E)
        got = fold_layer(br, E, chunk=128)                                   # 300 = 2 full chunks + 44
        assert got.dtype == torch.float64 and got.shape == (c.vocab_size, c.d_mem)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gate_on_residual", VARIANTS)
@pytest.mark.parametrize("qk_norm,tied", [(False, True), (True, False)])
def test_folded_model_gives_the_same_logits(gate_on_residual, qk_norm, tied):
    c = replace(TINY, gate_on_residual=gate_on_residual, qk_norm=qk_norm, tied=tied)
    model = init_random(c, seed=4, dtype=torch.float64)
    ids = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        model.fold()
        assert all(blk.meki.table is not None for blk in model.model.layers)
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)


def _reference_tables(sd: dict, c: MekiConfig) -> torch.Tensor:
    """[V, L*m] token-major, from fold_layer on a float64 model holding exactly `sd`'s values."""
    model = MekiForCausalLM(c).double()
    model.load_state_dict({k: v.double() for k, v in sd.items()})
    E = model.model.embed_tokens.weight
    return torch.cat([fold_layer(blk.meki, E) for blk in model.model.layers], dim=1)


@pytest.mark.parametrize("gate_on_residual", VARIANTS)
def test_streaming_fold_equals_fold_layer(gate_on_residual):
    c = replace(TINY, gate_on_residual=gate_on_residual)
    sd = {k: v.to(torch.bfloat16) for k, v in init_random(c, seed=5).state_dict().items()}  # checkpoint dtype
    want = _reference_tables(sd, c)

    chunks = list(fold_chunks(c, sd, chunk=77, dtype=torch.float64, progress=False))
    assert [len(x) for x in chunks] == [77, 77, 77, 69]
    got = torch.cat(chunks)
    assert got.dtype == torch.float64 and got.shape == (c.vocab_size, c.n_layer * c.d_mem)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    f32 = torch.cat(list(fold_chunks(c, sd, progress=False)))                # the converter's default
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), want, rtol=1e-5, atol=1e-5)


def test_streaming_fold_leaves_the_checkpoint_alone():
    c = TINY
    sd = init_random(c, seed=6).state_dict()
    copy = {k: v.clone() for k, v in sd.items()}
    for _ in fold_chunks(c, sd, chunk=100, progress=False):
        pass
    assert all(torch.equal(sd[k], copy[k]) for k in sd)
