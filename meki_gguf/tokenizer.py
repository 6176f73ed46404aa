"""Tokenizer -> the `tokenizer.*` GGUF metadata, exactly as llama.cpp's own converter writes it.

`--tokenizer PATH` is either
  * a GGUF file (any llama.cpp model or vocab file): every `tokenizer.*` key is copied, or
  * a Hugging Face tokenizer directory (Qwen3's: tokenizer.json, tokenizer_config.json):
    converted by llama.cpp's own code (the `conversion` package of the pinned tree:
    TextModel.get_vocab_base / _set_vocab_gpt2, or _set_vocab_sentencepiece when there is a
    tokenizer.model, as for Qwen2/3; gguf.SpecialVocab for merges, special ids, chat template).
Without --tokenizer the checkpoint's own folder is used when it holds a Hugging Face tokenizer.

The token list must have exactly V entries (the rows of token_embd and meki_mem): a shorter
one is padded with `[PAD{i}]` tokens of type UNUSED (llama.cpp's padding); trailing padding
beyond V (a GGUF padded for a bigger model: type UNUSED, or named `[PAD{i}]` as older
converters wrote it) is dropped; any other excess is an error.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf.gguf_writer import GGUFValue

from .errors import MekiError

TOKENS, TYPES, SCORES = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"

# A Hugging Face tokenizer folder's files (what `export-hf` copies next to the weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def find_tokenizer(folder: str | Path) -> Path | None:
    """The checkpoint folder itself, if it holds a Hugging Face tokenizer."""
    d = Path(folder)
    return d if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file() else None


def tokenizer_kv(path: str | Path, n_vocab: int) -> dict[str, GGUFValue]:
    """The `tokenizer.*` keys for a model with n_vocab rows, from a GGUF or a HF directory."""
    path = Path(path)
    if path.is_dir():
        kv = _from_hf(path, n_vocab)
    elif path.is_file():
        kv = _from_gguf(path)
    else:
        raise MekiError(f"tokenizer {path}: no such file or directory")
    return _fit(kv, n_vocab, path)


def _from_gguf(path: Path) -> dict[str, GGUFValue]:
    try:
        fields = gguf.GGUFReader(path).fields
    except Exception as e:  # GGUFReader raises ValueError/struct errors/... on a foreign file
        raise MekiError(f"tokenizer {path}: not a GGUF file nor a tokenizer directory ({e})") from None
    kv = {}
    for f in fields.values():
        if f.name.startswith("tokenizer."):
            vtype = f.types[0]
            kv[f.name] = GGUFValue(f.contents(), vtype, f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    if TOKENS not in kv:
        raise MekiError(f"tokenizer {path}: this GGUF holds no tokenizer ({TOKENS})")
    return kv


def _from_hf(path: Path, n_vocab: int) -> dict[str, GGUFValue]:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise MekiError(f"tokenizer {path}: no tokenizer.json or tokenizer.model in this folder")
    try:
        from conversion.base import TextModel
        from conversion.meki import MekiModel
    except ImportError as e:
        raise MekiError(f"a Hugging Face tokenizer needs llama.cpp's conversion package, which meki-gguf "
                        f"installs (a checkout: scripts/install.sh): {e}") from None

    class Vocab:
        """Just the part of llama.cpp's MekiModel that its vocab code uses."""
        get_vocab_base = TextModel.get_vocab_base
        does_token_look_special = TextModel.does_token_look_special
        find_hparam = TextModel.find_hparam
        _set_vocab_gpt2 = TextModel._set_vocab_gpt2
        _set_vocab_sentencepiece = TextModel._set_vocab_sentencepiece
        _create_vocab_sentencepiece = TextModel._create_vocab_sentencepiece

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return MekiModel.get_vocab_base_pre(self, tokenizer)
            except NotImplementedError:
                raise MekiError(f"tokenizer {path}: llama.cpp does not recognize its BPE pre-tokenizer") from None

    # as llama.cpp's Qwen2Model.set_vocab: SentencePiece if there is a tokenizer.model, else BPE.
    # BPE gets vocab_size = V: llama.cpp pads it (and any id holes) and asserts on ids >= V. The
    # SentencePiece code would silently drop tokens >= V, so it converts at its own size and
    # _fit pads or refuses.
    sp = (path / "tokenizer.model").is_file()
    v = Vocab()
    v.dir_model, v.hparams, v.gguf_writer = path, {} if sp else {"vocab_size": n_vocab}, gguf.GGUFWriter(None, "meki")
    try:
        if sp:
            v._set_vocab_sentencepiece()
        else:
            v._set_vocab_gpt2()
    except AssertionError:  # get_vocab_base: a token id >= vocab_size
        from transformers import AutoTokenizer
        n = len(AutoTokenizer.from_pretrained(path))
        raise MekiError(f"tokenizer {path} has {n} tokens, more than the model's {n_vocab} "
                        f"embedding/table rows") from None
    except MekiError:
        raise
    except Exception as e:  # transformers/sentencepiece on a broken or foreign folder
        raise MekiError(f"tokenizer {path}: cannot convert it ({type(e).__name__}: {e})") from None
    return {k: val for k, val in v.gguf_writer.kv_data[0].items() if k.startswith("tokenizer.")}


def _fit(kv: dict[str, GGUFValue], n_vocab: int, src: Path) -> dict[str, GGUFValue]:
    """Pad or trim the per-token arrays to exactly n_vocab entries; check the special ids."""
    n = len(kv[TOKENS].value)
    pad = {TOKENS: lambda i: f"[PAD{i}]", TYPES: lambda i: int(gguf.TokenType.UNUSED), SCORES: lambda i: -10000.0}
    if n > n_vocab:
        # padding: type UNUSED, or named [PAD{i}] (older converters typed it USER_DEFINED)
        toks, types = kv[TOKENS].value, kv[TYPES].value if TYPES in kv else [None] * n
        n_real = next((i + 1 for i in reversed(range(n))
                       if types[i] != gguf.TokenType.UNUSED and toks[i] != f"[PAD{i}]"), 0)
        if n_real > n_vocab:
            raise MekiError(f"tokenizer {src} has {n_real} tokens, more than the model's {n_vocab} "
                            f"embedding/table rows")
    for key, fill in pad.items():
        if key in kv:
            old = list(kv[key].value)[:n_vocab]
            kv[key] = GGUFValue(old + [fill(i) for i in range(len(old), n_vocab)], kv[key].type, kv[key].sub_type)
    for key, val in kv.items():
        if key.endswith("_token_id") and not 0 <= int(val.value) < n_vocab:
            raise MekiError(f"tokenizer {src}: {key} = {val.value} is outside the model's {n_vocab} rows")
    return kv


# --- a real, small BPE tokenizer for tests and demos ------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
MeKi scales a small language model with storage instead of compute. Every transformer layer
gets a memory table indexed by the token id; the table lives on disk and one row is read per
token. Before deployment the training form is folded into a plain lookup table, so inference
costs a row read plus two small matrix products per layer. The quick brown fox jumps over the
lazy dog. Hello, world! How are you today? I am fine, thank you. What is the capital of France?
The capital of France is Paris. 1 2 3 4 5 6 7 8 9 10 100 1000 2026. Numbers, words, and
punctuation: commas, periods. Questions? Answers! It's, I'm, you're, we've, they'll, he'd.
"""


def tiny_tokenizer_dir(out_dir: str | Path, n_tokens: int = 320) -> Path:
    """A small tokenizer for tests and the demo: `train_bpe_dir` on a fixed text."""
    return train_bpe_dir([_CORPUS] * 4, out_dir, n_tokens)


def train_bpe_dir(texts: list[str], out_dir: str | Path, n_tokens: int) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and write it (Hugging Face format, Qwen2/3
    pre-tokenizer, ChatML special tokens and chat template) to out_dir. It has n_tokens tokens
    (256 bytes, the merges learnt, then 3 special tokens last as in Qwen), converts with
    llama.cpp's code to pre "qwen2", and llama.cpp tokenizes with it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conversion.meki import QWEN2_PRE_TOKENIZER

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    split, byte_level = QWEN2_PRE_TOKENIZER["pretokenizers"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split["pattern"]["Regex"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=n_tokens - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(specials)
    if tok.get_vocab_size() != n_tokens:
        raise ValueError(f"BPE tokenizer: the texts give {tok.get_vocab_size()} tokens, not {n_tokens}")

    # Qwen's conventions: no BOS is added, <|endoftext|> is BOS and padding, <|im_end|> ends a turn
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", add_bos_token=False,
                                 clean_up_tokenization_spaces=False, model_max_length=4096)
    hf.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    if json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"] != QWEN2_PRE_TOKENIZER:
        raise AssertionError("BPE tokenizer: the pre-tokenizer serialized differently: llama.cpp would not recognize it")
    return out_dir
