"""The patch series on another llama.cpp tree (`scripts/port_patches.py SRC` applies cpp/ and
patches/ to it and builds it into build/port/, then runs these with -m port): its llama-logits
against the PyTorch reference for both specs (f32, the bars of the pinned build), and quantized
files (a q8_0 table, a scaled q4_1 table) against the model they hold (parity.file_model), with the
pinned build's figures beside."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from meki_gguf import parity, runtime
from meki_gguf.quantize import quantize
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
        root = tmp_path_factory.mktemp(name)
        ckpt, paths = build(root, tok, replace(TINY, dyn_norm=te, qk_norm=qk, tied=tied),
                            types=(("f32", "f32"), ("f16", "q8_0")))
        paths["f32", "q4_1"] = quantize(paths["f32", "f32"], root / "f32-q4_1.gguf", "q4_1", method="scaled")
        out[name] = parity.reference(ckpt), paths, ckpt
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_port_f32_matches_reference(files, prompt, variant):
    ref, paths, _ = files[variant]
    p = parity.against_reference(ref, prompt, *parity.tool_greedy(BIN / "llama-logits", paths["f32", "f32"], prompt,
                                                                    N_GEN)[:2])
    print(f"\nport, {variant}, f32 vs reference: {p.summary()}")
    assert p.max_rel_err <= parity.MAX_REL_ERR and p.top1 == 1.0 and p.greedy == p.greedy_ref


@pytest.mark.parametrize("types", [("f16", "q8_0"), ("f32", "q4_1")], ids=["q8_0-table", "scaled-q4_1-table"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_port_quantized_matches_the_file(files, prompt, variant, types):
    """The port fed the file model's greedy continuation: the quantized bars against the model the
    file holds (test_targets.py says why that, not another build, is the arbiter), and printed
    beside, the pinned build's figures on the same sequence."""
    _, paths, ckpt = files[variant]
    greedy, expected = parity.file_run(ckpt, paths[types], prompt, N_GEN)
    for name, exe in (("pinned build", runtime.LLAMA_BIN / "llama-logits"), ("port", BIN / "llama-logits")):
        got, logits, _ = parity.tool_greedy(exe, paths[types], prompt, N_GEN, forced=greedy[:-1])
        p = parity.against(prompt, got, logits, expected, greedy)
        print(f"\n{name}, {variant}, {'/'.join(types)} vs the file's model: {p.summary()}")
        assert p.top1_holds(parity.MIN_TOP1) and p.mean_kl <= parity.MAX_MEAN_KL, name
