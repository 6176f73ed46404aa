"""The `meki-gguf` command line. Commands are thin: the work is in the stage modules.

Every user-facing problem (MekiError, a usage error, an OS error, Ctrl-C) ends as one line
`error: ...` on stderr and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from .errors import MekiError


def _needs_converter(command: str) -> None:
    """The converter's packages are an extra (`pip install meki-gguf[convert]`): the runtime (chat,
    generate, inspect, quantize, the llama.cpp tools, the Python API) runs without them."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):               # a broken install counts as missing
            return True

    missing = [m for m in ("torch", "transformers", "safetensors") if absent(m)]
    if missing:
        raise MekiError(f"`meki-gguf {command}` needs the converter's packages: pip install 'meki-gguf[convert]' "
                        f"({', '.join(missing)} not installed)")


def _fail(msg: str, code: int = 1):
    click.echo(f"error: {' '.join(str(msg).split())}", err=True)
    sys.exit(code)


class _Cli(click.Group):
    def main(self, args=None, prog_name=None, **kwargs):
        kwargs["standalone_mode"] = False                    # we print the errors ourselves
        try:
            rc = super().main(args, prog_name, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:     # bare `meki-gguf`: the help
            click.echo(e.format_message(), err=True)
            sys.exit(2)
        except click.UsageError as e:
            _fail(f"{e.format_message()} (see {e.ctx.command_path if e.ctx else 'meki-gguf'} --help)", 2)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except MekiError as e:
            _fail(str(e))
        except OSError as e:                                 # disk full, permission denied, ...
            _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}")
        sys.exit(rc if isinstance(rc, int) else 0)


@click.group(cls=_Cli, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """MeKi language models in GGUF: convert a checkpoint (or export it for transformers),
    inspect a file, run it
    (generate, chat; `demo` does it all on a small built-in model).

    MeKi adds a token-indexed memory table to every layer of a small decoder. `convert` folds
    it into one token-major table (`meki_mem.weight`) next to a Qwen3-style backbone, in the
    format of docs/FORMAT.md, which the patched llama.cpp runs. See `meki-gguf COMMAND --help`.
    """


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The GGUF file to write (written atomically: it appears complete or not at all).")
@click.option("--outtype", default="f16", show_default=True, metavar="TYPE",
              help="Type of the 2-D backbone tensors: f32, f16, bf16 or q8_0 (norms are always f32).")
@click.option("--table-type", metavar="TYPE",
              help="Type of the memory table: f32, f16, bf16, or any type of `meki-gguf quantize` "
                   "(quantized with that type's best method, as `quantize` does). Default: f16.")
@click.option("--table-bits", type=float, metavar="BITS",
              help="Instead of --table-type: a budget in bits per value, as `quantize --table-bits`.")
@click.option("--cold-type", metavar="TYPE", help="Two tiers, as `quantize --cold-type`.")
@click.option("--hot-rows", type=int, metavar="N", help="Two tiers, as `quantize --hot-rows`.")
@click.option("--row-order-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Two tiers, as `quantize --row-order-text`.")
@click.option("--tokenizer", type=click.Path(exists=True, path_type=Path), metavar="PATH",
              help="A GGUF to copy the tokenizer from, or a Hugging Face tokenizer folder (Qwen3's). "
                   "Default: the checkpoint folder's own tokenizer.json, if any.")
def convert(src: Path, out: Path, outtype: str, table_type: str | None, table_bits: float | None,
            cold_type: str | None, hot_rows: int | None, row_order_text: Path | None, tokenizer: Path | None):
    """Convert the MeKi checkpoint SRC to a MeKi GGUF.

    SRC is a Megatron-LM checkpoint (the root with latest_checkpointed_iteration.txt, an
    iter_NNNNNNN folder or the model_optim_rng.pt file; torch format, TP=1, PP=1) or a Hugging
    Face-style folder (config.json + safetensors). The memory branch is folded in float32 into
    the table (T_l = alpha * RMSNorm(M_l + beta * G_l(E)), every layer, every token), then
    rounded to --table-type once.
    """
    # the fold is many mid-sized ops: OpenMP threads spinning between them starve each other on a
    # small loaded machine (2.3-3.5x slower, docs/BENCHMARKS.md). Read once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _needs_converter("convert")
    from .checkpoint import load_checkpoint
    from .write import OUT_TYPES, TABLE_TYPES, parse_type, write_gguf

    tiers = dict(table_bits=table_bits, cold_type=cold_type, hot_rows=hot_rows, row_order_text=row_order_text)
    table_type = table_type or (None if table_bits is not None else "f16")
    parse_type(outtype, OUT_TYPES, "--outtype")                 # fail before a long load
    if table_type is not None:
        parse_type(table_type, TABLE_TYPES, "--table-type")
    ckpt = load_checkpoint(src)
    write_gguf(ckpt, out, outtype=outtype, table_type=table_type, tokenizer=tokenizer,
               tiers=tiers if any(v is not None for v in tiers.values()) else None)
    click.echo(f"wrote {out} ({_size(out.stat().st_size)})")


@main.command("export-hf")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="A Hugging Face tokenizer folder whose files are copied in. Default: the checkpoint "
                   "folder's own tokenizer, if any.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Safetensors shards above this size are split (transformers' naming and index).")
def export_hf(src: Path, out_dir: Path, tokenizer: Path | None, max_shard_size: str):
    """Write the MeKi checkpoint SRC as a Hugging Face folder OUT_DIR: config.json, safetensors and
    the tokenizer files, loadable by transformers (`import meki_gguf` registers the model) and by
    llama.cpp's convert_hf_to_gguf.py; what you upload to the Hub.

    SRC is read as `convert` reads it (Megatron-LM or HF-style). The tensors keep their dtype and
    the training form. OUT_DIR must not exist or be empty; it appears complete or not at all.
    """
    _needs_converter("export-hf")
    from .atomic import temp_folder
    from .checkpoint import export_hf as export, load_checkpoint
    from .tokenizer import TOKENIZER_FILES, find_tokenizer
    from .write import source_dir

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MekiError(f"{out_dir} exists and is not an empty folder")
    ckpt = load_checkpoint(src)
    out_dir.parent.mkdir(parents=True, exist_ok=True)            # as save_pretrained does
    tok = tokenizer or find_tokenizer(source_dir(ckpt.path))
    with temp_folder(out_dir) as tmp:      # and a killed export's temp folder is removed
        try:
            export(ckpt.config, ckpt.tensors, tmp, max_shard_size=max_shard_size)
            if tok is not None:
                for name in TOKENIZER_FILES:
                    if (tok / name).is_file():
                        shutil.copy2(tok / name, tmp / name)
            if out_dir.exists():
                out_dir.rmdir()
            os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    click.echo(f"wrote {out_dir} ({', '.join(sorted(p.name for p in out_dir.iterdir()))})")
    if tok is None:
        click.echo("note: no tokenizer copied (none given with --tokenizer, none next to the checkpoint)", err=True)


@main.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--table-type", metavar="TYPE",
              help="Type of the memory table: f32, f16, bf16, q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, "
                   "q4_0, iq4_xs, iq4_nl, mxfp4, nvfp4, q3_k, iq3_s, iq3_xxs, q2_k, iq2_s, iq2_xs, q2_0, "
                   "iq2_xxs, tq2_0, iq1_m, tq1_0, iq1_s or q1_0; its block must divide the memory width m. "
                   "docs/BENCHMARKS.md recommends one per storage budget. With --cold-type: the hot rows' type.")
@click.option("--table-bits", type=float, metavar="BITS",
              help="Instead of --table-type: a budget in bits per value; the measured recommendation for it "
                   "(one type from 4.5 bits, two tiers below; docs/BENCHMARKS.md).")
@click.option("--table-method", type=click.Choice(["auto", "plain", "weighted", "scaled"]), default="auto",
              show_default=True,
              help="How the table is rounded: auto (the type's best measured method), plain (llama.cpp's "
                   "rounding), weighted (its rounding search), scaled (columns stored divided by their "
                   "RMS, the scales in the file; weighted search).")
@click.option("--type", "backbone_type", metavar="TYPE",
              help="llama-quantize type of the backbone (Q8_0, Q4_K_M, ...). Default: keep it as it is.")
@click.option("--allow-requantize", is_flag=True,
              help="Allow re-quantizing tensors that are already quantized (lower quality than "
                   "quantizing from f32/f16).")
@click.option("--cold-type", metavar="TYPE",
              help="Two tiers: the table's rows past --hot-rows in this type, the first ones in --table-type "
                   "(docs/FORMAT.md). Token ids of Qwen's vocabulary follow frequency: its first 16,384 hold "
                   "~90% of English and code tokens.")
@click.option("--hot-rows", type=int, metavar="N", help="Two tiers: how many rows (the first token ids) are hot.")
@click.option("--row-order-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Two tiers: order the rows by the tokens' frequency in FILE (stored in the file), for a "
                   "vocabulary or language whose token ids do not follow frequency.")
@click.option("-t", "--threads", type=int, help="Threads for llama-quantize (default: all cores).")
def quantize(src: Path, out: Path, table_type: str | None, table_bits: float | None, table_method: str,
             backbone_type: str | None, allow_requantize: bool, cold_type: str | None, hot_rows: int | None,
             row_order_text: Path | None, threads: int | None):
    """Write the MeKi GGUF SRC to OUT with the table in --table-type and the backbone in --type.

    The table's type is independent of the backbone's. The work is the patched llama-quantize's,
    which leaves the table alone unless named (--tensor-type meki_mem=TYPE). Quantize from an
    f32/f16 table (`convert --table-type f32`). With --cold-type and --hot-rows the table is
    written in two tiers, the frequent tokens' rows in --table-type and the others in --cold-type.
    OUT appears complete or not at all.
    """
    from .quantize import quantize as run, table_spec

    run(src, out, backbone_type=backbone_type, allow_requantize=allow_requantize, threads=threads,
        method=None if table_method == "auto" else table_method,
        **table_spec(src, table_type, table_bits, cold_type, hot_rows, row_order_text))
    click.echo(f"wrote {out} ({_size(out.stat().st_size)})")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def inspect(file: Path):
    """Show what the MeKi GGUF FILE holds: dimensions, tensor types, and the memory budget
    (weights held in RAM vs the table read row by row from disk)."""
    import gguf

    from .quantize import IMPORTANCE
    from .runtime import LEGACY_GATE_KEY, read_header

    kv, tensors = read_header(file, meki=True)

    def key(name):
        if f"meki.{name}" not in kv:
            raise MekiError(f"{file}: MeKi GGUF without meki.{name}")
        return kv[f"meki.{name}"]

    L, d, m = key("block_count"), key("embedding_length"), key("embedding_length_per_layer_input")
    table = tensors.get("meki_mem.weight")
    if table is None:
        raise MekiError(f"{file}: MeKi GGUF without the table meki_mem.weight")
    n_tok = kv.get("tokenizer.ggml.tokens", 0)              # an array: its length
    cold = tensors.get("meki_mem_cold.weight")              # a two-tier table's cold rows
    tiers = [t for t in (table, cold) if t is not None]
    V = sum(int(t.shape[1]) for t in tiers)
    types: dict[str, int] = {}
    for t in tensors.values():
        if t not in tiers:
            types[t.type.name.lower()] = types.get(t.type.name.lower(), 0) + 1
    ram = sum(t.nbytes for t in tensors.values() if t not in tiers)

    def row_bytes(t) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[t.type]
        return L * m // block * type_size
    ftype = kv.get("general.file_type")
    if kv.get("meki.memory.gate_on_residual") is True:      # llama.cpp refuses it: say so here too
        raise MekiError(f"{file}: {LEGACY_GATE_KEY}")
    qk = "blk.0.attn_q_norm.weight" in tensors
    rows = [
        ("file", f"{file} ({_size(file.stat().st_size)}), GGUF v{kv.get('GGUF.version')}, "
                 f"name {kv.get('general.name', '?')!r}"),
        ("model", f"{L} layers, d {d}, m {m}, FFN {key('feed_forward_length')}, heads "
                  f"{key('attention.head_count')}/{key('attention.head_count_kv')} x {key('attention.key_length')}, "
                  f"vocab {V}, context {key('context_length')}"),
        ("rope", f"theta {key('rope.freq_base'):g} (NEOX), RMSNorm eps {key('attention.layer_norm_rms_epsilon'):.3g}, "
                 f"QK-norm {'yes' if qk else 'no'}, output {'untied' if 'output.weight' in tensors else 'tied'}"),
        ("tokenizer", f"{kv.get('tokenizer.ggml.model', 'none')} (pre {kv.get('tokenizer.ggml.pre', '-')}), "
                      f"{n_tok} tokens"),
        ("types", f"backbone {', '.join(f'{c} {n}' for n, c in sorted(types.items()))}"
                  f"{f' (file type {ftype})' if ftype is not None else ''}; table "
                  f"{'/'.join(t.type.name.lower() for t in tiers)}"),
        ("in RAM", f"{_size(ram)} in {len(tensors) - len(tiers)} tensors"),
        ("table", f"meki_mem.weight {{{L}*{m}, {int(table.shape[1])}}} {table.type.name.lower()}: "
                  f"{_size(table.nbytes)}, read by row"
                  f"{'; columns stored divided by blk.N.meki_mem_scale (scaled)' if 'blk.0.meki_mem_scale.weight' in tensors else ''}"
                  f"{'; weighted rounding' if kv.get('quantize.imatrix.file') == IMPORTANCE else ''}"),
    ]
    if cold is not None:
        order = "a stored row order (meki.memory.row_order)" if "meki.memory.row_order" in kv else "the token ids' order"
        bits = 8 * sum(t.nbytes for t in tiers) / (V * L * m)
        rows += [("cold tier", f"meki_mem_cold.weight {{{L}*{m}, {int(cold.shape[1])}}} {cold.type.name.lower()}: "
                               f"{_size(cold.nbytes)}; the hot tier holds the first {int(table.shape[1]):,} rows of "
                               f"{order}; {bits:.2f} bits per value in all")]
    each = [f"{row_bytes(t)}" + (f" ({t.type.name.lower()})" if cold is not None else "") for t in tiers]
    rows.append(("per token", f"{L * m} table values = {' or '.join(each)} bytes read"))
    for k, v in rows:
        click.echo(f"{k:<10} {v}")


_table_resident = click.option(
    "--table-resident", is_flag=True,
    help="Load the memory table into RAM; by default it stays in the mapped file and only the rows "
         "of the tokens seen are read.")
_ctx = click.option("-c", "--ctx-size", "n_ctx", default=0, show_default=True,
                    help="Context length in tokens; 0 is the model's training context.")
_seed = click.option("--seed", type=int, help="Sampling seed (default: random).")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-p", "--prompt", required=True, help="The text to continue.")
@click.option("-n", "--n-predict", "n", default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--temp", default=0.8, show_default=True, help="Sampling temperature; 0 is greedy.")
@_seed
@_ctx
@_table_resident
def generate(model: Path, prompt: str, n: int, temp: float, seed: int | None, n_ctx: int, table_resident: bool):
    """Continue PROMPT with the MeKi GGUF MODEL, streaming the text as it comes."""
    from .runtime import load

    llm = load(model, table_resident=table_resident, n_ctx=n_ctx)
    for chunk in llm(prompt, max_tokens=n, temperature=temp, seed=seed, stream=True):
        click.echo(chunk["choices"][0]["text"], nl=False)
    click.echo()


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-s", "--system", help="A system message to start the conversation with.")
@click.option("-n", "--n-predict", "n", default=160, show_default=True, help="Tokens per reply at most.")
@click.option("--temp", default=0.7, show_default=True, help="Sampling temperature; 0 is greedy.")
@_seed
@_ctx
@_table_resident
def chat(model: Path | None, system: str | None, n: int, temp: float, seed: int | None, n_ctx: int,
         table_resident: bool):
    """Chat with the MeKi GGUF MODEL (default: the embedded trained demo model).

    The file's chat template formats the conversation. It is kept while it leaves room for a reply
    in the context (-c, by default the model's training context); then its oldest exchanges are
    dropped. Type /exit or press Ctrl-D to quit; Ctrl-C stops a reply (and quits at the prompt).
    """
    from .runtime import load

    if model is None:
        from .demo import default_model
        model = default_model(log=lambda msg: click.echo(msg, err=True))
    llm = load(model, table_resident=table_resident, n_ctx=n_ctx)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history in input())
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    click.echo(f"{model.name}: /exit or Ctrl-D quits, Ctrl-C stops a reply", err=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):                # quitting is no error
            click.echo()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        history = _fit(llm, history, len(start), n)
        reply = ""
        try:
            for chunk in llm.create_chat_completion(history, max_tokens=n, temperature=temp, seed=seed, stream=True):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                reply += piece
                click.echo(piece, nl=False)
        except KeyboardInterrupt:                            # keep what was shown; back to the prompt
            click.echo(" [stopped]", nl=False)
        except ValueError as e:                              # llama-cpp-python: the prompt exceeds n_ctx
            click.echo(f"\n(the conversation no longer fits the context of {llm.n_ctx()} tokens ({e}): "
                       f"starting a new one)", err=True)
            history = list(start)
            continue
        click.echo()
        history.append({"role": "assistant", "content": reply})


def _fit(llm, history: list[dict], keep: int, reply_tokens: int) -> list[dict]:
    """The conversation without its oldest exchanges (after the first `keep` messages) until it
    leaves room for a reply of reply_tokens, or half the context (the template's few tokens per
    message counted roughly)."""
    room = min(reply_tokens, llm.n_ctx() // 2)
    sizes = [len(llm.tokenize(m["content"].encode(), add_bos=False)) + 8 for m in history]
    while len(history) > keep + 1 and sum(sizes) + room > llm.n_ctx():
        drop = 2 if history[keep]["role"] == "user" and len(history) > keep + 2 else 1
        history, sizes = history[:keep] + history[keep + drop:], sizes[:keep] + sizes[keep + drop:]
    return history


@main.command()
@click.option("-n", "--n-predict", "n", default=32, show_default=True, help="Greedy tokens to generate and compare.")
@click.option("--n-chat", default=200, show_default=True, help="Tokens of the trained model's reply at most.")
def demo(n: int, n_chat: int):
    """The main job in one command: build a small MeKi checkpoint (random weights, official
    Megatron-LM layout) in the cache folder, convert it, run it through the patched llama.cpp and
    print the parity measured against the PyTorch reference, then the text it generated; last,
    one chat turn with the embedded trained MeKi model (the default of `meki-gguf chat`).

    The prompt spans several ubatches (of 16 tokens) and is followed by 1-token decode steps,
    with an f32 file and an f32 KV cache; the relative logit error at a position is
    max|llama.cpp - reference| / max|reference| over its logits. Exits non-zero if the parity
    misses its bar. Deterministic; built once, then reused.
    """
    _needs_converter("demo")
    from . import demo as d
    from . import parity
    from .checkpoint import load_checkpoint

    path = d.build(log=click.echo)
    ckpt = load_checkpoint(d.checkpoint_dir())
    c = ckpt.config
    click.echo(f"checkpoint  {d.checkpoint_dir()} (Megatron-LM, {c.n_layer} layers, d {c.d_model}, "
               f"m {c.d_mem}, vocab {c.vocab_size}, transformer_impl "
               f"{'transformer_engine' if c.dyn_norm else 'local'}, random weights)")
    click.echo(f"GGUF        {path} ({_size(path.stat().st_size)}, f32, table read lazily by row)")
    llm = parity.open_llama(path)
    prompt = llm.tokenize(d.PROMPT.encode(), add_bos=False)
    p = parity.compare(llm, parity.reference(ckpt), prompt, n_gen=n)
    click.echo(f"parity      vs the PyTorch reference, {len(p.rel_err)} positions ({p.n_prompt} prompt tokens in "
               f"ubatches of {llm.context_params.n_ubatch}, then {n - 1} 1-token decode steps):")
    click.echo(f"            max relative logit error {p.max_rel_err:.2e} (bar {parity.MAX_REL_ERR:g}), "
               f"top-1 agreement {p.top1:.0%}")
    click.echo(f"            greedy continuation: {p.greedy_same}/{len(p.greedy)} tokens identical")
    text = llm.detokenize(p.greedy).decode("utf-8", "replace")
    click.echo(f"generation  {d.PROMPT!r} -> {text!r}")
    click.echo("            (random weights: this checks the pipeline; the trained model talks below)")
    if p.max_rel_err > parity.MAX_REL_ERR or p.greedy_same < len(p.greedy):
        raise MekiError("parity with the PyTorch reference failed (see above)")

    from .runtime import load
    model = d.default_model(log=click.echo)
    click.echo(f"\nchat        {model} ({_size(model.stat().st_size)}; `meki-gguf chat` continues from here)")
    if (about := d.embedded_summary()) and model == d.EMBEDDED:
        click.echo(f"            {about}")
    click.echo(f"> {d.CHAT_PROMPT}")
    llm = load(model, n_ctx=0)
    finish = None
    for chunk in llm.create_chat_completion([{"role": "user", "content": d.CHAT_PROMPT}],
                                            max_tokens=n_chat, stream=True, **d.CHAT_SAMPLING):
        click.echo(chunk["choices"][0]["delta"].get("content") or "", nl=False)
        finish = chunk["choices"][0].get("finish_reason") or finish
    click.echo()
    click.echo("            (the reply ended with <|im_end|>)" if finish == "stop" else
               f"            (the reply reached the {n_chat}-token limit)")


# The patched llama.cpp's own tools, from wherever meki-gguf is installed:
# `meki-gguf llama-server -m MODEL --port 8080` runs llama-server with those arguments.
TOOLS = ("llama-cli", "llama-server", "llama-bench", "llama-quantize", "llama-perplexity")


def _tool_command(name: str) -> None:
    @main.command(name, add_help_option=False, context_settings={"ignore_unknown_options": True},
                  help=f"The patched llama.cpp's {name}; every argument goes to it ({name} --help).")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def run(args: tuple[str, ...]):
        from .runtime import llama_tool

        exe = llama_tool(name)
        os.execv(exe, [str(exe), *args])      # the tool's own exit code, signals and output


for _name in TOOLS:
    _tool_command(_name)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


if __name__ == "__main__":
    main()
