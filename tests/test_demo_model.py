"""The embedded demo model (meki_gguf/data/meki-demo.gguf, made by scripts/train_demo.py --install):
present, small, a folded MeKi GGUF with a q8_0 table and the trained tokenizer, its provenance
recorded, and llama.cpp tokenizes and runs it."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

DATA = Path(__file__).parents[1] / "meki_gguf" / "data"
MODEL, PROV = DATA / "meki-demo.gguf", DATA / "meki-demo.json"


def test_demo_model_file():
    assert MODEL.is_file(), "run scripts/train_demo.py --install"
    assert MODEL.stat().st_size < 15e6
    r = gguf.GGUFReader(MODEL)
    arch = r.fields["general.architecture"].contents()
    assert arch == "meki"
    assert r.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert "<|im_start|>" in r.fields["tokenizer.chat_template"].contents()
    t = {x.name: x for x in r.tensors}
    assert t["meki_mem.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert "blk.0.meki.memory.weight" not in t            # folded


def test_demo_provenance():
    p = json.loads(PROV.read_text())
    assert p["provenance"]["corpus"]["package"] == "python3.11-doc"
    assert p["provenance"]["config"]["dyn_norm"] is False          # the local spec's G_l
    for k in ("meki", "dense"):
        assert p[k]["heldout_ppl"] > 1
    assert p["check_meki"]["top1"] >= 0.95


def test_demo_runs_in_llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=256, verbose=False)
    ids = llm.tokenize(b"The for statement in Python", add_bos=False)
    assert llm.detokenize(ids) == b"The for statement in Python"
    out = llm.create_completion("The for statement in Python", max_tokens=8, temperature=0.0)
    assert out["choices"][0]["text"]
