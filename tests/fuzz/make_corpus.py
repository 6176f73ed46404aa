#!/usr/bin/env python3
"""Write the fuzzer's seed corpus, tests/fuzz/corpus/: the smallest valid MeKi GGUFs, one per layer
spec x QK-norm x tied/untied, with several backbone and table types, converted by our converter
from official-layout checkpoints (random weights), as users' files are made. The q4_0 and q4_1
tables are written by their default method, scaled: those seeds carry the column scales
(blk.N.meki_mem_scale), one layer and two.

Also writes tests/fuzz/regressions/: one file per crash the fuzzer found (fixed in
patches/llama.cpp/0008 and 0013), made from a seed by the smallest edit that triggers it, with the
load error llama.cpp now gives instead (REGRESSIONS), or the warning of a file that now loads
(LOADED); and the hostile two-tier files (HOSTILE): tiers or a row order that do not fit the
vocabulary. tests/test_hostile_gguf.py checks each.

Small on purpose (a 272-token tokenizer, d = m = 32, 1 or 2 layers: 30-80 KB each): libFuzzer mutates
every byte, and a small file is loaded in milliseconds. Deterministic: re-running it rewrites the
same files. Usage: .venv/bin/python tests/fuzz/make_corpus.py
"""
from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from meki_models import build  # noqa: E402

from meki_gguf.model import MekiConfig  # noqa: E402
from meki_gguf.quantize import quantize  # noqa: E402
from meki_gguf.tokenizer import tiny_tokenizer_dir  # noqa: E402

N_TOK = 272                                   # the byte alphabet, 13 merges, the 3 special tokens
SEEDS = {  # name: (Transformer Engine spec (G has an input norm), QK-norm, tied, layers, backbone type, table type)
    "te-noqk-tied-1l-f32-f32": (True, False, True, 1, "f32", "f32"),
    "te-qk-untied-2l-f16-q8_0": (True, True, False, 2, "f16", "q8_0"),
    "local-qk-untied-1l-f16-f16": (False, True, False, 1, "f16", "f16"),
    "local-noqk-tied-2l-f16-q4_0": (False, False, True, 2, "f16", "q4_0"),
    "local-qk-tied-2l-q8_0-q8_0": (False, True, True, 2, "q8_0", "q8_0"),
    "te-qk-tied-1l-bf16-q4_1": (True, True, True, 1, "bf16", "q4_1"),
    # two tiers (docs/FORMAT.md): half the rows q8_0, half q4_0, in a stored row order (reversed ids)
    "local-qk-tied-2l-f16-q8_0+q4_0": (False, True, True, 2, "f16", "q8_0+q4_0"),
}
TWO_TIER = "local-qk-tied-2l-f16-q8_0+q4_0"



def _swap(old: bytes, new: bytes):
    def edit(data: bytes) -> bytes:
        assert data.count(old) == 1, old
        return data.replace(old, new)
    return edit


# name: (seed, edit of its bytes, what llama.cpp now logs when it refuses the file). The tokens are GGUF strings: u64 length + bytes
REGRESSIONS = {
    # two equal tokens: was GGML_ASSERT(id_to_token.size() == token_to_id.size()) in llama-vocab.cpp
    "duplicate-token.gguf": ("te-qk-tied-1l-bf16-q4_1", _swap(b"!\x01" + bytes(7) + b'"', b"!\x01" + bytes(7) + b"!"),
                             "tokenizer.ggml.tokens has 1 duplicate tokens"),
    # a key's type outside enum gguf_type (type 8 is a string): was UB (UBSan: invalid enum load) in gguf.cpp
    "invalid-key-type.gguf": ("te-qk-tied-1l-bf16-q4_1", _swap(b"general.architecture\x08\0\0\0",
                                                               b"general.architecture\xff\xff\0\0"),
                              "invalid gguf_type 65535"),
    # a tensor type outside enum ggml_type (BF16 is 30): the same, for tensor infos
    "invalid-tensor-type.gguf": ("te-qk-tied-1l-bf16-q4_1",
                                 _swap(b"token_embd.weight" + struct.pack("<IQQI", 2, 32, N_TOK, 30),
                                       b"token_embd.weight" + struct.pack("<IQQI", 2, 32, N_TOK, 4096)),
                                 "invalid ggml_type 4096"),
    # general.alignment 1 (the u32 key general.file_type renamed; f16 is 1): the data is not 32-byte
    # aligned in the file, and mapping it was GGML_ASSERT("buffer pointer must be aligned")
    "alignment-1.gguf": ("local-qk-untied-1l-f16-f16", _swap(b"general.file_type", b"general.alignment"),
                         "of the file is not aligned to 32 bytes: it cannot be mapped"),
    # meki.block_count 0 (u32, type 4): was GGML_ASSERT(n_layer_all > 0 && ...) in llama-model.cpp
    "block-count-0.gguf": ("te-noqk-tied-1l-f32-f32", _swap(b"meki.block_count\x04\0\0\0\x01\0\0\0",
                                                            b"meki.block_count\x04\0\0\0\0\0\0\0"),
                           "meki.block_count = 0: must be in [1, 512]"),
    # meki.attention.key_length 2 (u32; the heads are 16 wide): was GGML_ASSERT(n_embd_head ==
    # hparams.n_embd_head_k()) in cpp/src/models/meki.cpp's graph, at the first decode
    "key-length-2.gguf": ("te-noqk-tied-1l-f32-f32", _swap(b"meki.attention.key_length\x04\0\0\0\x10\0\0\0",
                                                           b"meki.attention.key_length\x04\0\0\0\x02\0\0\0"),
                          "attention key length 2, value length 16 and rope dimension 2 must be equal"),
}

# name: (seed, edit, llama.cpp's load error): two-tier files whose tiers or row order do not fit the
# vocabulary (the tokens' rows are checked at load, not at the first token that meets them)
_ORDER = b"meki.memory.row_order" + struct.pack("<IIQ", 9, 4, N_TOK)          # array of u32, then the rows
_COLD = b"meki_mem_cold.weight" + struct.pack("<I", 2)                         # 2 dims, then ne0 = L*m, ne1
HOSTILE = {
    "two-tier-no-cold-tier.gguf": (TWO_TIER, _swap(b"meki_mem_cold.weight", b"meki_mem_cxld.weight"),
                                   "meki_mem.weight has 136 rows for a vocabulary of 272 and there is no "
                                   "meki_mem_cold.weight for the other 136"),
    # the cold tier's bytes as 68 rows of 128 values: 136 + 68 rows for 272 tokens
    "two-tier-rows-do-not-add-up.gguf": (TWO_TIER, _swap(_COLD + struct.pack("<QQ", 64, 136), _COLD + struct.pack("<QQ", 128, 68)),
                                         "tensor 'meki_mem_cold.weight' has wrong shape; expected     64,    136, got    128,     68"),
    "two-tier-order-repeats-a-row.gguf": (TWO_TIER, _swap(_ORDER + struct.pack("<II", 271, 270), _ORDER + struct.pack("<II", 270, 270)),
                                          "meki.memory.row_order is not a permutation of the 272 rows: token 1 has row 270, another token's"),
    "two-tier-order-out-of-range.gguf": (TWO_TIER, _swap(_ORDER + struct.pack("<I", 271), _ORDER + struct.pack("<I", 272)),
                                         "meki.memory.row_order is not a permutation of the 272 rows: token 0 has row 272, out of range"),
}

# name: (seed, edit, the warning llama.cpp now logs): files that load, where the fuzzer found UB
LOADED = {
    # general.file_type past enum llama_ftype's range (u32, type 4; f16 is 1): was UB (UBSan: invalid
    # enum load in llama_model_loader::print_info); fixed in patches/llama.cpp/0013
    "file-type-out-of-range.gguf": ("local-qk-untied-1l-f16-f16",
                                    _swap(b"general.file_type\x04\0\0\0\x01\0\0\0",
                                          b"general.file_type\x04\0\0\0\0\0\0\x51"),
                                    "invalid general.file_type 1358954496, using the guessed type"),
}


def main() -> None:
    out = HERE / "corpus"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer_dir(Path(tmp) / "tok", n_tokens=N_TOK)
        for i, (name, (te, qk, tied, n_layer, otype, ttype)) in enumerate(SEEDS.items()):
            c = MekiConfig(vocab_size=N_TOK, n_layer=n_layer, d_model=32, d_mem=32, d_ff=32, n_head=2, n_kv_head=1,
                           head_dim=16, max_seq_len=64, qk_norm=qk, tied=tied, dyn_norm=te)
            dst = out / f"{name}.gguf"
            if "+" in ttype:                          # two tiers, from the f32 table
                hot, cold = ttype.split("+")
                _, paths = build(Path(tmp) / name, tok, c, types=((otype, "f32"),), trained=False, seed=i)
                quantize(paths[otype, "f32"], dst, hot, cold_type=cold, hot_rows=N_TOK // 2,
                         row_order=np.arange(N_TOK)[::-1].copy())
            else:
                _, paths = build(Path(tmp) / name, tok, c, types=((otype, ttype),), trained=False, seed=i)
                dst.write_bytes(paths[otype, ttype].read_bytes())
            print(f"{dst.relative_to(HERE.parents[1])}: {dst.stat().st_size} bytes")
    (HERE / "regressions").mkdir(exist_ok=True)
    for name, (seed, edit, _) in {**REGRESSIONS, **LOADED, **HOSTILE}.items():
        (HERE / "regressions" / name).write_bytes(edit((out / f"{seed}.gguf").read_bytes()))


if __name__ == "__main__":
    main()
