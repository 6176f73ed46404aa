"""The Hugging Face route (issue: meet MeKi checkpoints where they live):

* transformers: `AutoModelForCausalLM.from_pretrained` on our layout, training and folded form,
  against the PyTorch reference and against llama.cpp (logits and 32 greedy tokens);
* `save_pretrained` / `export-hf` write the layout `load_checkpoint` reads, sharded too;
* llama.cpp's own convert_hf_to_gguf.py (the patched tree's, with our MekiModel class) writes the
  same GGUF, key for key and tensor for tensor, as `meki-gguf convert`, from an HF folder and from
  a Megatron checkpoint exported with `export-hf`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

import meki_gguf  # noqa: F401 (registers "meki" with the Auto classes)
from meki_gguf import parity
from meki_gguf.checkpoint import load_checkpoint, save_megatron
from meki_gguf.cli import main
from meki_gguf.model import MekiConfig, MekiForCausalLM, init_random
from meki_gguf.quantize import quantize
from meki_gguf.write import write_gguf
from meki_models import TINY, build, corpus_ids, tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONVERT_HF = ROOT / "build" / "src" / "convert_hf_to_gguf.py"      # llama.cpp's, in the patched tree
VARIANTS = [pytest.param(False, id="local"), pytest.param(True, id="te")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return tokenizer(tmp_path_factory.mktemp("tok"))


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def llama_convert(folder: Path, out: Path, *args: str) -> Path:
    r = subprocess.run([sys.executable, str(CONVERT_HF), str(folder), "--outfile", str(out), *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def assert_same_gguf(a: Path, b: Path) -> None:
    """Identical metadata (every key and value) and identical tensors (name, type, shape, bytes)."""
    A, B = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ka = {k: f.contents() for k, f in A.fields.items()}
    kb = {k: f.contents() for k, f in B.fields.items()}
    assert set(ka) == set(kb), set(ka) ^ set(kb)
    assert [k for k in ka if ka[k] != kb[k]] == []
    ta, tb = {t.name: t for t in A.tensors}, {t.name: t for t in B.tensors}
    assert set(ta) == set(tb), set(ta) ^ set(tb)
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert list(ta[name].shape) == list(tb[name].shape), name
        assert np.array_equal(ta[name].data, tb[name].data), name


# --- transformers --------------------------------------------------------------------------------

@pytest.mark.parametrize("dyn_norm", VARIANTS)
def test_auto_classes_load_training_and_folded_form(tmp_path, dyn_norm):
    c = replace(TINY, dyn_norm=dyn_norm, qk_norm=True, tied=False)
    ref = init_random(c, seed=1, dtype=torch.float64)
    ids = torch.randint(0, c.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits

    ref.save_pretrained(tmp_path / "train")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "train"), MekiConfig)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "train", dtype=torch.float64)
    assert type(hf) is MekiForCausalLM and not hf.config.folded
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=0)            # exact in float64

    ref.fold()
    ref.save_pretrained(tmp_path / "folded")
    cfg = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert cfg["folded"] is True and cfg["model_type"] == "meki" and cfg["architectures"] == ["MekiForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "folded", dtype=torch.float64)
    assert hf.config.folded and hf.model.layers[0].meki.table.shape == (c.vocab_size, c.d_mem)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=1e-10)        # the fold is exact


def test_save_pretrained_is_our_layout_sharded_too(tmp_path):
    c = replace(TINY, dyn_norm=True)
    model = init_random(c, seed=2)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "shards", max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "shards").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    sd = model.state_dict()
    for folder in ("one", "shards"):
        ck = load_checkpoint(tmp_path / folder)
        assert ck.config.dyn_norm and not ck.config.folded and set(ck.tensors) == set(sd)
        assert all(torch.equal(ck.tensors[k], sd[k]) for k in sd)


def test_generate_and_logits_match_llama_cpp(tmp_path, tok):
    """transformers (cached generation) vs llama.cpp on the same trained checkpoint's f32 GGUF."""
    ckpt, paths = build(tmp_path / "m", tok, TINY)
    cli("export-hf", tmp_path / "m" / "megatron", tmp_path / "hf", "--tokenizer", tok)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    prompt = corpus_ids(tok)[:50]

    llm = parity.open_llama(paths["f32", "f32"], n_ubatch=16)
    p = parity.compare(llm, hf, prompt, n_gen=32)
    print(f"\ntransformers vs llama.cpp (f32 GGUF): {p.summary()}")
    assert p.max_rel_err <= 1e-4 and p.top1 == 1.0

    out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert out == p.greedy                                       # llama.cpp's 32 greedy tokens
    with torch.no_grad():                                        # and transformers vs the reference
        ids = torch.tensor([prompt])
        ref = parity.reference(ckpt)
        rel = (hf(ids).logits.double() - ref(ids).logits).abs().max() / ref(ids).logits.abs().max()
    assert rel <= 1e-6, rel


# --- llama.cpp's converter -----------------------------------------------------------------------

@pytest.mark.parametrize("dyn_norm", VARIANTS)
def test_convert_hf_to_gguf_writes_our_gguf(tmp_path, tok, dyn_norm):
    c = replace(TINY, dyn_norm=dyn_norm, tied=not dyn_norm, qk_norm=dyn_norm)
    model = init_random(c, seed=3)
    src = tmp_path / "MeKi-tiny"
    model.save_pretrained(src)
    for f in tok.iterdir():
        shutil.copy(f, src)
    ours = write_gguf(load_checkpoint(src), tmp_path / "ours.gguf", outtype="f16", table_type="f16", progress=False)
    assert_same_gguf(ours, llama_convert(src, tmp_path / "theirs.gguf", "--outtype", "f16"))

    # a quantized table: llama.cpp's converter rounds it plainly (gguf-py), as it does any tensor;
    # meki-gguf's is its f32 table through `quantize` (the type's method), the same from both f32 files
    theirs = llama_convert(src, tmp_path / "theirs-q.gguf", "--outtype", "q8_0", "--meki-table-type", "q4_0")
    assert gguf.GGUFReader(theirs).get_tensor(-1).tensor_type == gguf.GGMLQuantizationType.Q4_0
    ours = write_gguf(load_checkpoint(src), tmp_path / "ours-q.gguf", outtype="q8_0", table_type="q4_0", progress=False)
    theirs = quantize(llama_convert(src, tmp_path / "theirs-f32.gguf", "--outtype", "q8_0", "--meki-table-type", "f32"),
                      tmp_path / "theirs-q4.gguf", "q4_0")
    assert_same_gguf(ours, theirs)


def test_folded_folder_converts_to_the_same_table(tmp_path, tok):
    c = TINY
    model = init_random(c, seed=4, dtype=torch.float64)
    model.save_pretrained(tmp_path / "train")
    model.fold()
    model.to(torch.float32).save_pretrained(tmp_path / "folded")
    for d in ("train", "folded"):
        for f in tok.iterdir():
            shutil.copy(f, tmp_path / d)
    a = llama_convert(tmp_path / "train", tmp_path / "a.gguf", "--outtype", "f32")
    b = llama_convert(tmp_path / "folded", tmp_path / "b.gguf", "--outtype", "f32")
    ours = write_gguf(load_checkpoint(tmp_path / "folded"), tmp_path / "ours.gguf", "f32", "f32", progress=False)
    ta = {t.name: t.data for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t.data for t in gguf.GGUFReader(b).tensors}
    assert set(ta) == set(tb)
    np.testing.assert_allclose(tb["meki_mem.weight"], ta["meki_mem.weight"], rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(ta[n], tb[n]) for n in ta if n != "meki_mem.weight")
    tours = {t.name: t.data for t in gguf.GGUFReader(ours).tensors}
    assert all(np.array_equal(tours[n], tb[n]) for n in tb)


def test_megatron_export_hf_round_trips_to_the_same_gguf(tmp_path, tok):
    c = replace(TINY, dyn_norm=True)
    mg = save_megatron(init_random(c, seed=5), tmp_path / "mg" / "MeKi-tiny", dtype=torch.bfloat16)
    ours = write_gguf(load_checkpoint(mg), tmp_path / "ours.gguf", "f16", "q8_0", tokenizer=tok, progress=False)

    out = tmp_path / "hub" / "MeKi-tiny"                          # the same folder name: the same general.name
    r = cli("export-hf", mg, out, "--tokenizer", tok, "--max-shard-size", "100KB")
    assert "config.json" in r.stdout and "tokenizer.json" in r.stdout
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert_same_gguf(ours, llama_convert(out, tmp_path / "theirs.gguf", "--outtype", "f16", "--meki-table-type", "q8_0"))
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), MekiForCausalLM)

    r = CliRunner().invoke(main, ["export-hf", str(mg), str(out)])          # no overwrite of a full folder
    assert r.exit_code != 0 and "exists" in r.stderr and not list((tmp_path / "hub").glob(".*tmp"))


# --- meki-gguf 0.1's misread variant -------------------------------------------------------------

@pytest.mark.parametrize("folded", [False, True])
def test_a_config_with_the_old_gate_variant_is_refused_everywhere(tmp_path, tok, folded):
    """`gate_on_residual: true` (written by meki-gguf 0.1) names a layer no MeKi model has: our
    reader, transformers and llama.cpp's converter each refuse it in one line; `false` was the one
    layer there is, and still loads."""
    model = init_random(replace(TINY, dyn_norm=True), seed=6)
    if folded:
        model.fold()
    src = tmp_path / "old"
    model.save_pretrained(src)
    for f in tok.iterdir():
        shutil.copy(f, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "gate_on_residual": True}))

    with pytest.raises(meki_gguf.MekiError, match="gate_on_residual=true: written by meki-gguf 0.1") as e:
        load_checkpoint(src)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="gate_on_residual=true"):
        AutoModelForCausalLM.from_pretrained(src)
    r = subprocess.run([sys.executable, str(CONVERT_HF), str(src), "--outfile", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "gate_on_residual=true" in r.stderr and not (tmp_path / "x.gguf").exists()

    (src / "config.json").write_text(json.dumps({**cfg, "gate_on_residual": False}))
    ck = load_checkpoint(src)
    assert ck.config.dyn_norm and ck.config.folded == folded and set(ck.tensors) == set(model.state_dict())
    assert isinstance(AutoModelForCausalLM.from_pretrained(src), MekiForCausalLM)


@pytest.mark.parametrize("module", ["meki_gguf.write", "meki_gguf.checkpoint", "meki_gguf.model", "meki_gguf.fold",
                                    "conversion.meki", "conversion", "meki_gguf.cli"])
def test_each_module_imports_first(module):
    """Importing transformers registers meki_gguf.model, and llama.cpp's conversion.base imports
    transformers half-way: whichever module a program imports first, no import cycle closes."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
