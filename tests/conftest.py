"""Fixtures shared by the runtime tests of every build (test_runtime.py: x86 through the Python
binding; test_targets.py: ARM64 and Vulkan through their tools). They import the PyTorch side
(meki_models) when used, not here: the GPU check (test_cuda.py) runs where only numpy, gguf-py
and the build are."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> Path:
    from meki_models import tokenizer
    return tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def prompt(tok) -> list[int]:
    """50 tokens: four ubatches of 16 in one decode call."""
    from meki_models import corpus_ids
    return corpus_ids(tok)[:50]


@pytest.fixture(scope="session")
def big(tmp_path_factory, tok) -> Path:
    """A Qwen-sized vocabulary (151936 rows) and 1 KiB table rows (2 layers x 128 x f32): 148 MiB."""
    from meki_models import TINY, build
    c = replace(TINY, vocab_size=151936, d_mem=128)
    _, paths = build(tmp_path_factory.mktemp("big"), tok, c, types=(("f16", "f32"),), trained=False)
    return paths["f16", "f32"]
