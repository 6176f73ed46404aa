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
    assert MODEL.stat().st_size <= 16e6
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
    assert p["provenance"]["training_tokens_per_model"] >= 20e6
    for k in ("meki", "dense"):
        assert p[k]["heldout_ppl"] > 1 and p[k]["answer_loss"] > 0
        assert len([e for e in p[k]["evals"] if e["step"] > 0]) >= 8      # the curve of docs/TRAINED_DEMO.md
    assert p["check_meki"]["top1"] >= 0.95
    assert p["demo_question"]["a_training_question"] is False     # the demo asks what it did not train on


def test_demo_model_ends_its_turns():
    """Teacher-forced on held-out questions and their answers (ChatML), llama.cpp gives the model's
    <|im_end|> far more probability right after a whole answer than inside it: it ends its replies
    where the documentation's answers end (PyTorch measured the same at training: meki-demo.json's
    stop_probability; an untrained model gives it 1/4096 everywhere)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    p = json.loads(PROV.read_text())
    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=512, logits_all=True, verbose=False)
    end = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    assert len(end) == 1
    at_end, inside = [], []
    for ex in p["heldout_examples"]:
        prompt = llm.tokenize(f"<|im_start|>user\n{ex['question']}<|im_end|>\n<|im_start|>assistant\n".encode(),
                              add_bos=False, special=True)
        ids = llm.tokenize(f"<|im_start|>user\n{ex['question']}<|im_end|>\n<|im_start|>assistant\n{ex['answer']}".encode(),
                           add_bos=False, special=True)
        if len(ids) >= 256:                          # the training context
            continue
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[len(prompt) - 1:len(ids)], dtype=np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs = probs[:, end[0]] / probs.sum(1)
        at_end.append(probs[-1])
        inside.append(probs[:-1].mean())
    print(f"\nP(<|im_end|>) over {len(at_end)} held-out answers: after the answer {np.mean(at_end):.3f}, inside it "
          f"{np.mean(inside):.4f} (PyTorch at training: {p['stop_probability']['meki']})")
    # measured 0.25 and 0.003: bars with a margin of 2.5x and 4x
    assert len(at_end) >= 8 and np.mean(at_end) > 0.1 and np.mean(at_end) > 20 * np.mean(inside)


def test_demo_runs_in_llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=256, verbose=False)
    ids = llm.tokenize(b"The for statement in Python", add_bos=False)
    assert llm.detokenize(ids) == b"The for statement in Python"
    out = llm.create_completion("The for statement in Python", max_tokens=8, temperature=0.0)
    assert out["choices"][0]["text"]
