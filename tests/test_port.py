"""The patch series on another llama.cpp tree (`scripts/port_patches.py SRC` applies cpp/ and
patches/ to it and builds it into build/port/, then runs these with -m port): its llama-logits
against the PyTorch reference for both specs (f32, the bars of the pinned build), and a quantized
file against the pinned build."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from meki_gguf import parity, runtime
from meki_models import TINY, build

pytestmark = pytest.mark.port

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "build" / "port" / "cmake" / "bin"
N_GEN = 32
VARIANTS = {"te-noqk-tied": (True, False, True), "local-qk-untied": (False, True, False)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    assert (BIN / "llama-logits").is_file(), f"no port build in {BIN}: run scripts/port_patches.py SRC"
    out = {}
    for name, (te, qk, tied) in VARIANTS.items():
        ckpt, paths = build(tmp_path_factory.mktemp(name), tok, replace(TINY, dyn_norm=te, qk_norm=qk, tied=tied),
                            types=(("f32", "f32"), ("f16", "q8_0")))
        out[name] = parity.reference(ckpt), paths
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_port_f32_matches_reference(files, prompt, variant):
    ref, paths = files[variant]
    p = parity.against_reference(ref, prompt, *parity.tool_greedy(BIN / "llama-logits", paths["f32", "f32"], prompt,
                                                                    N_GEN)[:2])
    print(f"\nport, {variant}, f32 vs reference: {p.summary()}")
    assert p.max_rel_err <= parity.MAX_REL_ERR and p.top1 == 1.0 and p.greedy == p.greedy_ref


@pytest.mark.parametrize("variant", VARIANTS)
def test_port_quantized_matches_the_pinned_build(files, prompt, variant):
    path = files[variant][1]["f16", "q8_0"]
    pinned = parity.tool_greedy(runtime.LLAMA_BIN / "llama-logits", path, prompt, N_GEN)
    port = parity.tool_greedy(BIN / "llama-logits", path, prompt, N_GEN, forced=pinned[0][:-1])
    p = parity.against(prompt, port[0], port[1], pinned[1], pinned[0])
    print(f"\nport vs the pinned build, {variant}, f16/q8_0: {p.summary()}")
    assert p.top1_holds(parity.MIN_TOP1) and p.mean_kl <= parity.MAX_MEAN_KL
