"""The checkpoint readers against hostile input (issue 10, item 3): every file `load_checkpoint`
is given ends as a one-line MekiError or a checkpoint whose tensors all read, never another
exception, a crash, a hang, a memory bomb or code run.

* deterministic regression tests (the default run): resource bombs with their peak RSS measured
  in a child process, deep nesting, symlink loops, code-running pickles (a marker-file canary),
  and the minimal inputs the fuzzer found;
* `-m fuzz`: hypothesis mutates real tiny checkpoints (the pickle inside a Megatron zip, the zip
  itself, a legacy torch file, Megatron args and state dicts, safetensors headers, config.json,
  a shard index) for MEKI_FUZZ_SECONDS per target (scripts/fuzz_checkpoints runs them all).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from meki_gguf.checkpoint import load_checkpoint, save_hf, save_megatron
from meki_gguf.checkpoint.unpickle import torch_load as _torch_load
from meki_gguf.errors import MekiError
from meki_gguf.model import MekiConfig, init_random

ROOT = Path(__file__).resolve().parents[1]
# small enough that a fuzz example costs milliseconds
SMALL = MekiConfig(vocab_size=32, n_layer=1, d_model=16, d_mem=8, d_ff=32, n_head=2, n_kv_head=1,
                   head_dim=8, max_seq_len=64)
MiB = 1 << 20


# --- loading everything ----------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` of the reader eats it."""


def full_load(path: Path):
    """load_checkpoint + everything the converter reads: the config and every tensor's data."""
    ck = load_checkpoint(path)
    asdict(ck.config)
    for name in ck.tensors:
        t = ck.tensors[name]
        t.float().sum()
    return ck


def outcome(path: Path, timeout: float = 20.0) -> str:
    """'ok' or the MekiError's message; any other exception (or a hang) propagates."""
    def alarm(*_):
        raise Hang(f"no answer after {timeout} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        full_load(path)
        return "ok"
    except MekiError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1, repr(msg)
        return msg
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- crafting torch files by hand ------------------------------------------------------------

class _Pid:
    """Pickled as a persistent id (what torch.save writes for a storage)."""

    def __init__(self, pid):
        self.pid = pid


class _Tensor:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), with any
    size and stride: what torch.save writes for a tensor, without torch's consistency."""

    def __init__(self, pid, offset, size, stride, state=None):
        self.args = (_Pid(pid), offset, size, stride, False, collections.OrderedDict())
        self.state = state

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args) + ((self.state,) if self.state else ())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def torch_zip(out: Path, pkl: bytes, storages: dict[str, bytes] = {}, compress: set[str] = set()) -> Path:
    """A torch.save-style zip: archive/data.pkl, archive/data/<key>, version, byteorder."""
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pkl, zipfile.ZIP_DEFLATED if "data.pkl" in compress else zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", "little")
        for k, data in storages.items():
            z.writestr(f"archive/data/{k}", data)
        z.writestr("archive/version", "3\n")
    return out


def legacy_file(out: Path, pkl: bytes, storages: dict[str, tuple[int, bytes]] = {}) -> Path:
    """The legacy (pre-1.6) torch.save format: magic, protocol, sys_info, the pickle, the storage
    keys, then each storage as its element count and data."""
    with open(out, "wb") as f:
        for head in (0x1950A86A20F9469CFC6C, 1001,
                     {"protocol_version": 1001, "little_endian": True,
                      "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(head, f, protocol=2)
        f.write(pkl)
        pickle.dump(list(storages), f, protocol=2)
        for numel, data in storages.values():
            f.write(struct.pack("<q", numel) + data)
    return out


def megatron_like(model) -> dict:
    return {"args": argparse.Namespace(num_layers=1), "model": model}


def float_pid(key: str, numel: int, legacy: bool = False) -> tuple:
    return ("storage", torch.FloatStorage, key, "cpu", numel) + ((None,) if legacy else ())


def nested(n: int, open_: bytes, close: bytes) -> bytes:
    """A pickle body nesting n containers: n opening opcodes, then n-1 closing ones."""
    return open_ * n + close * (n - 1)


# --- resource bombs: their peak RSS, measured in one child process ---------------------------

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint_fuzz import full_load
    from meki_gguf.errors import MekiError

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux
    full_load(Path(sys.argv[1]))            # warm up: imports, a real checkpoint read whole
    base = rss()
    print(json.dumps({{"case": "baseline", "peak": base}}), flush=True)
    for case, path in json.loads(sys.argv[2]).items():
        t = time.monotonic()
        try:
            full_load(Path(path))
            got = "ok"
        except MekiError as e:
            got = "MekiError: " + str(e)
        except BaseException as e:
            got = f"{{type(e).__name__}}: {{e}}"
        print(json.dumps({{"case": case, "got": got, "peak": rss(), "base": base,
                          "seconds": time.monotonic() - t}}), flush=True)
""")


def _zip_bomb(out: Path, inflated: int) -> Path:
    """data.pkl deflated: `inflated` bytes of zeros in a few MB (torch's reader inflates it whole)."""
    zeros = bytes(MiB)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            for _ in range(inflated // MiB):
                f.write(zeros)
        z.writestr("archive/version", "3\n")
    return out


def _bomb_files(d: Path) -> dict[str, Path]:
    d.mkdir()
    big = (1 << 20, 1 << 20)                             # 2**40 float32: 4 TiB
    return {
        # a tensor reaching far past its 16-byte storage: torch would grow a resizable storage
        "zip: tensor of 4 TiB on a 16-byte storage": torch_zip(
            d / "huge_tensor.pt", dumps(megatron_like({"w": _Tensor(float_pid("0", 4), 0, big, (1 << 20, 1))})),
            {"0": bytes(16)}),
        "zip: stride-0 tensor of 4 TiB": torch_zip(
            d / "stride0.pt", dumps(megatron_like({"w": _Tensor(float_pid("0", 4), 0, big, (0, 0))})),
            {"0": bytes(16)}),
        "zip: storage declaring 2**40 elements": torch_zip(
            d / "huge_storage.pt", dumps(megatron_like({"w": _Tensor(float_pid("0", 1 << 40), 0, big, (1 << 20, 1))})),
            {"0": bytes(16)}),
        # the legacy format allocates each storage at its declared size before reading it
        "legacy: storage declaring 2**31 elements (8 GiB)": legacy_file(
            d / "legacy_storage.pt", dumps(megatron_like({"w": _Tensor(float_pid("0", 1 << 31, True), 0, (1 << 31,), (1,))})),
            {"0": (1 << 31, bytes(16))}),
        "legacy: tensor of 4 GiB on a 16-byte storage": legacy_file(
            d / "legacy_tensor.pt", dumps(megatron_like({"w": _Tensor(float_pid("0", 4, True), 0, (1 << 30,), (1,))})),
            {"0": (4, bytes(16))}),
        # the pickle reads 16 GiB from the file object: the legacy format's is the file itself
        "legacy: pickle declaring a 16 GiB bytes object": legacy_file(
            d / "legacy_bytes.pt", b"\x80\x04\x8e" + struct.pack("<Q", 16 << 30) + b"x" * 64),
        "zip: pickle declaring a 16 GiB bytes object": torch_zip(
            d / "zip_bytes.pt", b"\x80\x04\x8e" + struct.pack("<Q", 16 << 30) + b"x" * 64),
        "safetensors: header declaring a 2**62-element tensor": _st_file(
            d / "st_huge", {"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 31, 1 << 31],
                                                           "data_offsets": [0, 16]}}, bytes(16)),
        "safetensors: header declaring 16 GiB, file of 16 bytes": _st_file(
            d / "st_offsets", {"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 32],
                                                              "data_offsets": [0, 1 << 34]}}, bytes(16)),
        "safetensors: header length 2**62": _st_raw(d / "st_len", struct.pack("<Q", 1 << 62) + b"{}"),
        "safetensors: header length 99 MB, file of 10 bytes": _st_raw(d / "st_len2", struct.pack("<Q", 99_000_000) + b"{}"),
        "zip bomb: data.pkl deflated, 256 MiB inflated": _zip_bomb(d / "zipbomb.pt", 256 * MiB),
        "nested lists, 100000 deep": torch_zip(d / "lists.pt", b"\x80\x02" + nested(100_000, b"]", b"a") + b"."),
        "nested dicts, 100000 deep": torch_zip(
            d / "dicts.pt", b"\x80\x02" + b"}K\x01" * 99_999 + b"}" + b"s" * 99_999 + b"."),
        # hash() of this tuple (a dict key) overflowed the C stack: SIGSEGV before the fix
        "nested tuples, 3000000 deep, as a dict key": torch_zip(
            d / "tuples.pt", b"\x80\x02}K\x01" + b"\x85" * 3_000_000 + b"K\x02s."),
        "nested placeholders (numpy objects), 100000 deep": torch_zip(
            d / "opaque.pt", b"\x80\x02cnumpy\nndarray\nq\x000" + b"h\x00" * 100_000 + b"K\x01"
            + b"\x85R" * 100_000 + b"."),
    }


def _st_raw(d: Path, data: bytes) -> Path:
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_hf_config()))
    (d / "model.safetensors").write_bytes(data)
    return d


def _st_file(d: Path, header: dict, data: bytes) -> Path:
    h = json.dumps(header).encode()
    return _st_raw(d, struct.pack("<Q", len(h)) + h + data)


def _hf_config() -> dict:
    return {**asdict(SMALL), "model_type": "meki", "architectures": ["MekiForCausalLM"]}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, dict]:
    """Each bomb read in one child process, after a real checkpoint was read whole there: the
    outcome and the child's peak RSS (ru_maxrss) after it, against that baseline."""
    d = tmp_path_factory.mktemp("bombs")
    warm = save_megatron(init_random(SMALL, seed=0), d / "warm", dtype=torch.float32)
    files = _bomb_files(d / "files")
    r = subprocess.run([sys.executable, "-c", _CHILD.format(tests=str(ROOT / "tests")), str(warm),
                        json.dumps({k: str(v) for k, v in files.items()})],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    rows = {(row := json.loads(line))["case"]: row for line in r.stdout.splitlines() if line.startswith("{")}
    assert r.returncode == 0, f"the child died ({r.returncode}) after {list(rows)[-1:]}: {r.stderr[-2000:]}"
    if os.environ.get("MEKI_FUZZ_REPORT"):                  # scripts/fuzz_checkpoints: the figures
        with open(os.environ["MEKI_FUZZ_REPORT"], "a") as f:
            f.write(json.dumps({"bombs": rows}) + "\n")
    return rows


BOMB_CASES = [
    ("zip: tensor of 4 TiB on a 16-byte storage", "refusing to load", "storage of 4 elements"),
    ("zip: stride-0 tensor of 4 TiB", "refusing to load", "storage of 4 elements"),
    ("zip: storage declaring 2**40 elements", "refusing to load", "1099511627776 elements"),
    ("legacy: storage declaring 2**31 elements (8 GiB)", "refusing to load", "2147483648 elements"),
    ("legacy: tensor of 4 GiB on a 16-byte storage", "refusing to load", "[1073741824]"),
    ("legacy: pickle declaring a 16 GiB bytes object", "not a checkpoint"),
    ("zip: pickle declaring a 16 GiB bytes object", "not a checkpoint"),
    ("safetensors: header declaring a 2**62-element tensor", "not a readable safetensors file"),
    ("safetensors: header declaring 16 GiB, file of 16 bytes", "not a readable safetensors file"),
    ("safetensors: header length 2**62", "not a readable safetensors file"),
    ("safetensors: header length 99 MB, file of 10 bytes", "not a readable safetensors file"),
    ("zip bomb: data.pkl deflated, 256 MiB inflated", "refusing to load", "compressed"),
    ("nested lists, 100000 deep", "not a checkpoint", "(a list)"),
    ("nested dicts, 100000 deep", "not a checkpoint", "with keys [1]"),
    ("nested tuples, 3000000 deep, as a dict key", "refusing to load", "nests tuples more than 100 deep"),
    ("nested placeholders (numpy objects), 100000 deep", "not a checkpoint", "(a ndarray)"),
]


@pytest.mark.parametrize("case,needles", [(c[0], c[1:]) for c in BOMB_CASES], ids=[c[0] for c in BOMB_CASES])
def test_resource_bomb_is_refused_with_bounded_memory(bombs, case, needles):
    row = bombs[case]
    got = row["got"]
    assert got.startswith("MekiError: ") and "\n" not in got, got
    for n in needles:
        assert n in got, got
    assert row["peak"] - row["base"] < 100 * MiB, (row["peak"] - row["base"]) / MiB
    assert row["seconds"] < 60, row


# --- code-running pickles: a marker-file canary ----------------------------------------------

class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _evil_pickles(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').close()"
    raw = lambda body: b"\x80\x02" + body + b"."       # noqa: E731
    s = lambda t: b"X" + struct.pack("<I", len(t.encode())) + t.encode()   # noqa: E731  BINUNICODE
    return {
        "os.system": dumps(_Evil(os.system, touch)),
        "builtins.exec": dumps(_Evil(exec, py)),
        "builtins.eval in args": dumps({"args": argparse.Namespace(hook=_Evil(eval, py)), "model": {}}),
        "subprocess.Popen": dumps(megatron_like({"x": _Evil(subprocess.Popen, ["touch", str(marker)])})),
        "subprocess.check_call": dumps(_Evil(subprocess.check_call, ["touch", str(marker)])),
        "getattr(os, 'system')": raw(b"cbuiltins\ngetattr\ncos\n" + b"X\x06\x00\x00\x00system\x86R" + s(touch) + b"\x85R"),
        "STACK_GLOBAL os system": b"\x80\x04" + s("os") + s("system") + b"\x93" + s(touch) + b"\x85R.",
        "STACK_GLOBAL with a newline": b"\x80\x04" + s("numpy") + s("x\nos.system") + b"\x93" + s(touch) + b"\x85R.",
        "a dotted name inside numpy": raw(b"cnumpy\nlib.os.system\n" + s(touch) + b"\x85R"),
        "torch._utils._rebuild_tensor_v2 of a callable": raw(
            b"ctorch._utils\n_rebuild_tensor_v2\ncos\nsystem\n" + s(touch) + b"K\x00)K\x01\x89}t\x85R"),
        "_codecs.encode with a codec name": raw(b"c_codecs\nencode\n" + s("x") + s("rot13") + b"\x86R"),
        # Tensor.__setstate__ calls set_(storage, offset, size, stride): it grows the storage
        "BUILD on a tensor": dumps({"t": _Tensor(float_pid("0", 1), 0, (1,), (1,),
                                                 state=(_Pid(float_pid("0", 1)), 0, (1 << 30,), (1,)))}),
        "BUILD on a storage": raw(b"}X\x01\x00\x00\x00s" + dumps(_Pid(float_pid("0", 1)))[2:-1]
                                  + b"}X\x05\x00\x00\x00dtypeK\x01sbs"),
    }


@pytest.mark.parametrize("form", ["zip", "legacy"])
def test_code_running_pickles_run_nothing(tmp_path, form):
    marker = tmp_path / "pwned"
    for name, pkl in _evil_pickles(marker).items():
        f = tmp_path / f"{form}.pt"
        if form == "zip":
            torch_zip(f, pkl, {"0": bytes(4)} if "BUILD" in name else {})
        else:
            legacy_file(f, pkl)
        msg = outcome(f)
        assert msg != "ok", name
        assert not marker.exists(), name
        if form == "zip" and "BUILD" in name:
            assert "sets the state of a" in msg, msg
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")      # torch.jit.script/save
def test_torchscript_archive_is_not_handed_to_torch_jit(tmp_path, monkeypatch):
    """torch.load reads a zip holding constants.pkl with torch.jit.load, past our unpickler."""
    m = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(m, tmp_path / "ts.pt")
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    assert "TorchScript" in outcome(tmp_path / "ts.pt")


# --- symlink loops -----------------------------------------------------------------------------

def test_symlink_loops(tmp_path):
    hf = tmp_path / "hf"
    save_hf(init_random(SMALL, seed=0), hf)
    meg = save_megatron(init_random(SMALL, seed=0), tmp_path / "meg")
    cases = {}
    d = tmp_path / "self"                                  # the path itself is a loop
    d.symlink_to(d)
    cases["the checkpoint path"] = d
    for name in ("config.json", "model.safetensors"):
        d = tmp_path / f"hf-{name}"
        shutil.copytree(hf, d)
        (d / name).unlink()
        (d / name).symlink_to(d / name)
        cases[f"HF {name}"] = d
    d = tmp_path / "hf-index"
    shutil.copytree(hf, d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").symlink_to(d / "model.safetensors.index.json")
    cases["HF index"] = d
    d = tmp_path / "hf-shard"
    shutil.copytree(hf, d)
    (d / "model.safetensors").rename(d / "a.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "b.safetensors"}}))
    (d / "b.safetensors").symlink_to(d / "c.safetensors")
    (d / "c.safetensors").symlink_to(d / "b.safetensors")
    cases["HF shard, a two-link loop"] = d
    d = tmp_path / "meg-tracker"
    shutil.copytree(meg, d, symlinks=True)
    (d / "latest_checkpointed_iteration.txt").unlink()
    (d / "latest_checkpointed_iteration.txt").symlink_to(d / "latest_checkpointed_iteration.txt")
    cases["Megatron tracker"] = d
    d = tmp_path / "meg-iter"
    shutil.copytree(meg, d, symlinks=True)
    shutil.rmtree(d / "iter_0001000")
    (d / "iter_0001000").symlink_to(d / "iter_0001000")
    cases["Megatron iteration folder"] = d
    d = tmp_path / "meg-file"
    shutil.copytree(meg, d, symlinks=True)
    pt = d / "iter_0001000/mp_rank_00/model_optim_rng.pt"
    pt.unlink()
    pt.symlink_to(pt)
    cases["Megatron .pt"] = d
    d = tmp_path / "meg-up"                                # a folder linking to its parent: no walk
    shutil.copytree(meg, d, symlinks=True)
    (d / "iter_0001000/mp_rank_00/up").symlink_to(d)
    (d / "iter_0001000/up").symlink_to(d / "iter_0001000")
    assert outcome(d) == "ok"
    for what, path in cases.items():
        assert outcome(path, timeout=10) != "ok", what


# --- the minimal inputs the fuzzer found (and other gaps found reading the readers) -------------

def _hf(tmp_path: Path, name: str = "hf") -> Path:
    d = tmp_path / name
    save_hf(init_random(SMALL, seed=0), d)
    return d


def _edit_config(d: Path, **kv) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_config_json_values(tmp_path):
    d = _hf(tmp_path)
    cases = {
        # n_layer is the number of modules built for the reference shapes: a hang before
        "n_layer=10**9": ({"n_layer": 10 ** 9}, "n_layer=1000000000 but the safetensors hold only"),
        # overflowing int64 in the meta model: RuntimeError before
        "d_model=2**62": ({"d_model": 1 << 62}, "no model has these sizes"),
        "vocab_size=2**70": ({"vocab_size": 1 << 70}, "no model has these sizes"),
        # JSON's NaN and Infinity passed as floats
        "rope_theta=NaN": ({"rope_theta": float("nan")}, "rope_theta=nan is not a finite number"),
        "norm_eps=Infinity": ({"norm_eps": float("inf")}, "norm_eps=inf is not a finite number"),
        # the message held the whole value: megabytes, and newlines in a key's repr are escaped
        "a huge value": ({"n_head": "x" * 1_000_000}, "is not an int"),
        "a nested value": ({"n_head": [[[[[[1]]]]]]}, "[[[[...]]]]"),
    }
    for what, (kv, needle) in cases.items():
        shutil.copyfile(d / "config.json", tmp_path / "saved.json")
        msg = outcome(_edit_config(d, **kv))
        assert needle in msg and len(msg) < 1000, (what, msg[:300])
        shutil.copyfile(tmp_path / "saved.json", d / "config.json")
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)     # RecursionError before
    assert "cannot read it as JSON" in outcome(d)
    (d / "config.json").write_bytes(b'{"model_type": "meki", "\xff": 1}')
    assert "cannot read it as JSON" in outcome(d)


def test_safetensors_error_with_a_line_break(tmp_path):
    """Found by the fuzzer: safetensors quotes the header's bad dtype, here \\x1e (a line break to
    str.splitlines), and the message held it raw."""
    d = _hf(tmp_path)
    _, h, data = _split_st((d / "model.safetensors").read_bytes())
    h["model.embed_tokens.weight"]["dtype"] = {"\x1e": None}
    (d / "model.safetensors").write_bytes(_join_st(h, data))
    assert "not a readable safetensors file" in outcome(d)


def _split_st(raw: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_st(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_index_values(tmp_path):
    d = _hf(tmp_path)
    (d / "model.safetensors").rename(d / "model-1.safetensors")
    index = d / "model.safetensors.index.json"
    # "x" * 300: found by the fuzzer, is_file() raises ENAMETOOLONG (OSError) for it
    for weight_map in ({"a": 1}, {"a": None}, {"a": ["x"]}, [1], "x", {"a": "x\0y"}, {"a": ""}, {"a": "x" * 300}):
        index.write_text(json.dumps({"weight_map": weight_map}))
        msg = outcome(d)                                   # TypeError (folder / 1) before
        assert str(d) in msg, msg
    index.write_text("[" * 100_000)
    assert "malformed index" in outcome(d)


def test_megatron_tracker_values(tmp_path):
    root = save_megatron(init_random(SMALL, seed=0), tmp_path / "ck")
    tracker = root / "latest_checkpointed_iteration.txt"
    for text in ("²", "1" * 5000, "\xff\xfe", "-1", "1e3", "release" + "x" * 10_000_000):
        tracker.write_bytes(text.encode("latin1" if text == "\xff\xfe" else "utf-8"))
        assert "latest_checkpointed_iteration.txt" in outcome(root), text
    tracker.write_text("1000\n")
    assert outcome(root) == "ok"


def _megatron_file(tmp_path: Path, edit) -> Path:
    """The tiny Megatron checkpoint with `edit(state)` applied, re-saved."""
    f = save_megatron(init_random(SMALL, seed=0), tmp_path / "m", dtype=torch.float32) / \
        "iter_0001000/mp_rank_00/model_optim_rng.pt"
    ck = _torch_load(f)
    ck["args"].model_type = None
    ck["rng_state"] = None
    ck["model"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ck["model"].items()}
    edit(ck)
    torch.save(ck, f)
    return f


@pytest.mark.parametrize("edit,needle", [
    # `!=` on a tensor is no bool: RuntimeError before
    (lambda ck: setattr(ck["args"], "swiglu", torch.ones(3)), "args.swiglu=tensor"),
    (lambda ck: setattr(ck["args"], "transformer_impl", torch.ones(3)), "args.transformer_impl="),
    (lambda ck: setattr(ck["args"], "normalization", "x\ny"), "args.normalization='x\\ny'"),
    # a 0-dim memory table without args.meki_dim: IndexError before
    (lambda ck: (delattr(ck["args"], "meki_dim"),
                 ck["model"].__setitem__("decoder.layers.0.meki_module.embeddings.weight", torch.ones(()))),
     "expected [vocab, meki_dim]"),
    # a key with a newline made a two-line message
    (lambda ck: ck["model"].__setitem__("a\nb", 1), "'a\\nb' is not a tensor"),
    (lambda ck: ck["model"].__setitem__("decoder.layers.0.x\ny", torch.ones(1)), "unexpected tensor"),
    # str() of a deeply nested key: RecursionError before
    (lambda ck: ck["model"].__setitem__(_deep_tuple(50), 1), "has a key"),
    (lambda ck: ck["model"].__setitem__(5, torch.ones(1)), "has a key 5, not a name"),
    # int() of 5000 digits: ValueError before
    (lambda ck: ck["model"].__setitem__("decoder.layers." + "1" * 5000 + ".x", torch.ones(1)), "unexpected tensor"),
    (lambda ck: setattr(ck["args"], "norm_epsilon", float("nan")), "norm_epsilon=nan is not a finite number"),
    (lambda ck: setattr(ck["args"], "hidden_size", 1 << 62), "no model has these sizes"),
    # found by the fuzzer: a bfloat16 tensor's repr spans lines ("dtype=torch.bfloat16" on its own)
    (lambda ck: setattr(ck["args"], "num_layers", torch.zeros([13], dtype=torch.bfloat16)),
     "args.num_layers=tensor([0., 0.,"),
    # found by the fuzzer: the layer check built list(range(num_layers)), 36 GB for 10**9 (OOM-killed)
    (lambda ck: setattr(ck["args"], "num_layers", 10**9), "args.num_layers=1000000000 but the checkpoint holds 1 layers"),
])
def test_megatron_values(tmp_path, edit, needle):
    msg = outcome(_megatron_file(tmp_path, edit))
    assert needle in msg and len(msg) < 2000, msg


def _deep_tuple(n):
    t = ()
    for _ in range(n):
        t = (t,)
    return t


def test_parameter_state_cannot_shadow_tensor_methods(tmp_path):
    """_rebuild_parameter_with_state sets attributes from the pickle: `reshape` would break the reader."""
    p = torch.nn.Parameter(torch.ones(2))
    p.reshape = 1
    f = tmp_path / "p.pt"
    torch.save({"p": p}, f)
    assert "sets the attribute 'reshape' of a Parameter" in outcome(f)
    q = torch.nn.Parameter(torch.ones(2))
    q.tensor_model_parallel = True                     # what Megatron sets: fine
    torch.save({"p": q}, f)
    assert _torch_load(f)["p"].tensor_model_parallel is True


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_compressed_or_duplicate_zip_members_are_refused(tmp_path):
    f = save_megatron(init_random(SMALL, seed=0), tmp_path / "m") / "iter_0001000/mp_rank_00/model_optim_rng.pt"
    with zipfile.ZipFile(f) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    assert "is compressed" in outcome(tmp_path / "deflated.pt")
    with zipfile.ZipFile(tmp_path / "dup.pt", "w") as z:
        for name, data in members + [m for m in members if m[0].endswith("data.pkl")]:
            z.writestr(name, data)
    assert "two members named" in outcome(tmp_path / "dup.pt")


def test_zip64_locator_of_a_multi_disk_zip(tmp_path):
    """Found by the checkpoint fuzzer: a ZIP64 end-of-directory locator that claims two disks made
    zipfile.is_zipfile raise BadZipFile (it returns False for other damage)."""
    f = save_megatron(init_random(SMALL, seed=0), tmp_path / "m") / "iter_0001000/mp_rank_00/model_optim_rng.pt"
    data = f.read_bytes()
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2)         # disk 0, offset 0, 2 disks
    f.write_bytes(data[:-22] + locator + data[-22:])                  # before the end-of-directory record
    assert "is not a readable zip file (zipfiles that span multiple disks" in outcome(f)


# --- export-hf after a killed export --------------------------------------------------------------

_EXPORT_CHILD = """
import os, signal, sys, time
from pathlib import Path
import meki_gguf.checkpoint as ck
from meki_gguf.cli import main
real = ck.export_hf
def slow(config, tensors, out, **kw):
    real(config, tensors, out, **kw)                 # the temp folder is written: now die
    Path(sys.argv[3]).touch()
    time.sleep(60)
ck.export_hf = slow
main(["export-hf", sys.argv[1], sys.argv[2]])
"""


def test_export_hf_cleans_a_killed_exports_temp_folder(tmp_path):
    src = save_megatron(init_random(SMALL, seed=0), tmp_path / "ck")
    out, ready = tmp_path / "out" / "hf", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _EXPORT_CHILD, str(src), str(out), str(ready)], cwd=ROOT)
    try:
        t = time.monotonic()
        while not ready.exists():
            assert child.poll() is None and time.monotonic() - t < 120, "the export did not start"
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    left = [p for p in out.parent.iterdir() if p.name != "hf"]
    assert left and not out.exists()                       # SIGKILL: the temp folder stays behind
    from click.testing import CliRunner
    from meki_gguf.cli import main
    r = CliRunner().invoke(main, ["export-hf", str(src), str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]   # the stale one is gone
    assert outcome(out) == "ok"


# =============================================================================================
# the fuzzer: hypothesis mutating real tiny checkpoints

FUZZ_SECONDS = float(os.environ.get("MEKI_FUZZ_SECONDS", "30"))     # per target
TRIED: dict[str, int] = collections.Counter()

try:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
except ImportError:                                      # the `test` extra: only -m fuzz needs it
    given = None


class Seeds:
    """Real tiny checkpoints to mutate, made once per session, and a marker that code run by a
    crafted pickle would create."""

    def __init__(self, d: Path):
        self.dir, self.marker = d, d / "pwned"
        model = init_random(SMALL, seed=0)
        pt = save_megatron(model, d / "meg", dtype=torch.float32) / "iter_0001000/mp_rank_00/model_optim_rng.pt"
        self.megatron = _torch_load(pt)
        self.megatron["args"].model_type = None          # placeholders do not pickle: plain values
        self.megatron["rng_state"] = None
        # the tensors cloned out of the loaded file; the layers' _extra_state entries (None, bytes
        # or BytesIO in the official checkpoints, save_megatron writes each form) kept as they are
        self.megatron["model"] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                  for k, v in self.megatron["model"].items()}
        with zipfile.ZipFile(pt) as z:
            self.zip_members = [(i.filename, z.read(i)) for i in z.infolist()]
        self.zip_bytes = pt.read_bytes()
        legacy = d / "legacy.pt"
        torch.save(self.megatron, legacy, _use_new_zipfile_serialization=False)
        self.legacy_bytes = legacy.read_bytes()
        # a checkpoint with a code-running object in it, to mutate too: the canary's seed
        evil = d / "evil.pt"
        torch.save(dict(self.megatron, hook=_Evil(os.system, f"touch {self.marker}")), evil)
        with zipfile.ZipFile(evil) as z:
            self.evil_members = [(i.filename, z.read(i)) for i in z.infolist()]
        self.hf = d / "hf"
        save_hf(model, self.hf)
        self.config = json.loads((self.hf / "config.json").read_text())
        self.st_bytes = (self.hf / "model.safetensors").read_bytes()
        self.sharded = d / "sharded"
        save_hf(model, self.sharded, max_shard_size="4KB")
        assert (self.sharded / "model.safetensors.index.json").is_file()
        self.index = json.loads((self.sharded / "model.safetensors.index.json").read_text())
        self.work = d / "work"
        self.work.mkdir()
        self.n = 0

    def fresh(self) -> Path:
        """A new folder per example: readers mmap files, so never rewrite one in place."""
        self.n += 1
        d = self.work / str(self.n)
        d.mkdir()
        return d

    def done(self, d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)


_seeds: Seeds | None = None


def seeds() -> Seeds:
    global _seeds
    if _seeds is None:
        _seeds = Seeds(Path(tempfile.mkdtemp(prefix="meki-fuzz-")))
    return _seeds


if given is not None:
    # byte-level edits: (kind, where, bytes); `where` is taken modulo the length
    INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
                   b"\xff" * 8, b"\x00\x00\x00\x00\x00\x00\x00\x40", b"(", b")", b".", b"]", b"}", b"R",
                   b"\x85", b"\x86", b"\x87", b"t", b"l", b"s", b"u", b"a", b"e", b"b", b"\x93",
                   b"cos\nsystem\n", b"cbuiltins\neval\n", b"ctorch\nSize\n", b"h\x00", b"q\x00",
                   b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f", b"J\xff\xff\xff\x7f", b"PK\x03\x04",
                   b"PK\x05\x06", b"PK\x01\x02"]
    edits = st.lists(st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"]),
        st.integers(0, 1 << 32),
        st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from(INTERESTING))), min_size=1, max_size=6)

    def mutate(data: bytes, ops) -> bytes:
        b = bytearray(data)
        for kind, where, val in ops:
            i = where % (len(b) + 1)
            if kind == "flip" and b:
                b[i % len(b)] ^= 1 << (val[0] % 8)
            elif kind == "set":
                b[i:i + len(val)] = val
            elif kind == "insert":
                b[i:i] = val
            elif kind == "delete":
                del b[i:i + 1 + val[0] % 64]
            elif kind == "truncate":
                del b[i:]
            elif kind == "repeat":
                b[i:i] = b[i:i + 1 + val[0] % 32] * (1 + val[-1] % 64)
        return bytes(b)

    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=20),
                  st.integers(-(1 << 70), 1 << 70),
                  st.sampled_from([0, -1, 1, 2, 3, 7, 1 << 31, 1 << 32, 1 << 62, 1 << 63, 1 << 64,
                                   10 ** 30, 0.5, -0.0, 1e308, "1", "", "meki", "\n"])),
        lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
        max_leaves=8)
    config_keys = st.sampled_from(list(asdict(SMALL)) + ["model_type", "architectures", "torch_dtype",
                                                          "weight_map", "metadata", "x"])

    def check(seed: Seeds, path: Path, target: str) -> None:
        TRIED[target] += 1
        try:
            outcome(path, timeout=30)
        finally:
            assert not seed.marker.exists(), "a mutated pickle ran code"

    def fuzz(target: str, strategy):
        """Run `test` on `strategy`'s examples in batches until the time budget is spent."""
        def decorate(test):
            @settings(max_examples=50, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
            @given(strategy)
            def one(example):
                test(seeds(), example)

            def run():
                end = time.monotonic() + FUZZ_SECONDS
                try:
                    while time.monotonic() < end:
                        one()
                finally:
                    print(f"\n{target}: {TRIED[target]} inputs tried")
                    if os.environ.get("MEKI_FUZZ_REPORT"):
                        with open(os.environ["MEKI_FUZZ_REPORT"], "a") as f:
                            f.write(json.dumps({"target": target, "tried": TRIED[target],
                                                "seconds": FUZZ_SECONDS}) + "\n")
            run.__name__ = test.__name__
            return pytest.mark.fuzz(run)
        return decorate

    def _rezip(members, out: Path) -> Path:
        with zipfile.ZipFile(out, "w") as z:
            for name, data in members:
                z.writestr(name, data)
        return out

    @fuzz("megatron-pickle", st.tuples(st.booleans(), edits))
    def test_fuzz_megatron_pickle(s: Seeds, ex):
        """Mutations of data.pkl inside the zip (re-zipped, so that the mutated pickle is parsed)."""
        evil, ops = ex
        d = s.fresh()
        members = [(n, mutate(data, ops) if n.endswith("/data.pkl") else data)
                   for n, data in (s.evil_members if evil else s.zip_members)]
        check(s, _rezip(members, d / "model_optim_rng.pt"), "megatron-pickle")
        s.done(d)

    @fuzz("megatron-zip", edits)
    def test_fuzz_megatron_zip(s: Seeds, ops):
        """Mutations of the zip container itself (headers, central directory, records)."""
        d = s.fresh()
        (d / "model_optim_rng.pt").write_bytes(mutate(s.zip_bytes, ops))
        check(s, d / "model_optim_rng.pt", "megatron-zip")
        s.done(d)

    @fuzz("legacy-torch", edits)
    def test_fuzz_legacy_torch_file(s: Seeds, ops):
        """Mutations of a legacy-format (pre-zip) torch.save file: pickles and raw storages."""
        d = s.fresh()
        (d / "model_optim_rng.pt").write_bytes(mutate(s.legacy_bytes, ops))
        check(s, d / "model_optim_rng.pt", "legacy-torch")
        s.done(d)

    tensor_values = st.one_of(
        st.builds(lambda shape, dt: torch.zeros(shape, dtype=dt),
                  st.lists(st.integers(0, 40), max_size=3),
                  st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8,
                                   torch.complex64])),
        json_values)
    megatron_edits = st.lists(st.one_of(
        st.tuples(st.just("arg"), st.sampled_from(["num_layers", "hidden_size", "ffn_hidden_size",
                                                     "num_attention_heads", "num_query_groups", "kv_channels",
                                                     "meki_dim", "padded_vocab_size", "normalization", "swiglu",
                                                     "transformer_impl", "qk_layernorm", "group_query_attention",
                                                     "untie_embeddings_and_output_weights", "rotary_base",
                                                     "norm_epsilon", "max_position_embeddings", "seq_length",
                                                     "tensor_model_parallel_size", "rotary_percent"]),
                  tensor_values),
        st.tuples(st.just("delarg"), st.integers(0, 100), st.none()),
        st.tuples(st.just("tensor"), st.integers(0, 100), tensor_values),
        st.tuples(st.just("deltensor"), st.integers(0, 100), st.none()),
        st.tuples(st.just("newkey"), st.one_of(st.text(max_size=40), st.sampled_from(
            ["decoder.layers.1.x", "decoder.layers.0.mlp.linear_fc1.bias", "model0", "args"])), tensor_values),
        st.tuples(st.just("top"), st.sampled_from(["args", "model", "model0", "iteration"]), tensor_values),
    ), min_size=1, max_size=4)

    @fuzz("megatron-state", megatron_edits)
    def test_fuzz_megatron_args_and_tensors(s: Seeds, ops):
        """Structured mutations of the Megatron args and state dict, saved by torch.save."""
        ck = dict(s.megatron, args=argparse.Namespace(**vars(s.megatron["args"])), model=dict(s.megatron["model"]))
        for kind, key, val in ops:
            args = ck.get("args") if isinstance(ck.get("args"), argparse.Namespace) else None
            names = (sorted(vars(args)) if args else []) if kind == "delarg" else \
                list(ck["model"]) if isinstance(ck.get("model"), dict) else []
            if kind == "arg" and args:
                setattr(args, key, val)
            elif kind == "delarg" and names:
                delattr(args, names[key % len(names)])
            elif kind in ("tensor", "deltensor") and names:
                name = names[key % len(names)]
                if kind == "tensor":
                    ck["model"][name] = val
                else:
                    del ck["model"][name]
            elif kind == "newkey" and isinstance(ck.get("model"), dict):
                ck["model"][key] = val
            elif kind == "top":
                ck[key] = val
        d = s.fresh()
        torch.save(ck, d / "model_optim_rng.pt")
        check(s, d / "model_optim_rng.pt", "megatron-state")
        s.done(d)

    def _hf_copy(s: Seeds, src: Path) -> Path:
        d = s.fresh() / "hf"
        shutil.copytree(src, d)
        return d

    header_edits = st.lists(st.one_of(
        st.tuples(st.just("shape"), st.integers(0, 100), st.lists(st.one_of(
            st.integers(-2, 1 << 65), st.sampled_from([0, 1 << 31, 1 << 32, 1 << 62, 1 << 63, -1]), json_values),
            max_size=4)),
        st.tuples(st.just("offsets"), st.integers(0, 100), st.lists(st.one_of(
            st.integers(-2, 1 << 65), st.sampled_from([0, 1 << 32, 1 << 63, 1 << 64])), max_size=3)),
        st.tuples(st.just("dtype"), st.integers(0, 100), st.one_of(
            st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "F64", "C64", "X"]), json_values)),
        st.tuples(st.just("name"), st.integers(0, 100), st.text(max_size=30)),
        st.tuples(st.just("entry"), st.integers(0, 100), json_values),
        st.tuples(st.just("bytes"), st.integers(0, 100), edits),
    ), min_size=1, max_size=4)

    @fuzz("safetensors-header", header_edits)
    def test_fuzz_safetensors_header(s: Seeds, ops):
        """Mutations of the 8-byte header length and the JSON header (structured and bytewise);
        the tensor data after it is kept."""
        n = struct.unpack("<Q", s.st_bytes[:8])[0]
        header, data = json.loads(s.st_bytes[8:8 + n]), s.st_bytes[8 + n:]
        raw = None
        for kind, i, val in ops:
            names = [k for k in header if k != "__metadata__"]
            name = names[i % len(names)] if names else "x"
            entry = header.get(name) if isinstance(header.get(name), dict) else {}
            if kind in ("shape", "offsets", "dtype"):
                entry[{"offsets": "data_offsets"}.get(kind, kind)] = val
                header[name] = entry
            elif kind == "name" and name in header:
                header[val] = header.pop(name)
            elif kind == "entry":
                header[name] = val
            elif kind == "bytes":
                h = json.dumps(header).encode()
                raw = mutate(struct.pack("<Q", len(h)) + h, val)
        if raw is None:
            h = json.dumps(header).encode()
            raw = struct.pack("<Q", len(h)) + h
        d = _hf_copy(s, s.hf)
        (d / "model.safetensors").write_bytes(raw + data)
        check(s, d, "safetensors-header")
        s.done(d.parent)

    config_edits = st.lists(st.one_of(
        st.tuples(st.just("set"), config_keys, json_values),
        st.tuples(st.just("del"), config_keys, st.none()),
        st.tuples(st.just("bytes"), st.just(""), edits),
        st.tuples(st.just("whole"), st.just(""), json_values),
    ), min_size=1, max_size=4)

    @fuzz("config-json", config_edits)
    def test_fuzz_config_json(s: Seeds, ops):
        """config.json: values of every type (negative, huge, float, strings, nested), missing and
        unknown keys, and byte edits of the text."""
        cfg, text = dict(s.config), None
        for kind, key, val in ops:
            if kind == "set" and isinstance(cfg, dict):
                cfg[key] = val
            elif kind == "del" and isinstance(cfg, dict):
                cfg.pop(key, None)
            elif kind == "whole":
                cfg = val
            elif kind == "bytes":
                text = mutate(json.dumps(cfg).encode(), val)
        d = _hf_copy(s, s.hf)
        (d / "config.json").write_bytes(text if text is not None else json.dumps(cfg).encode())
        check(s, d, "config-json")
        s.done(d.parent)

    index_edits = st.lists(st.one_of(
        st.tuples(st.just("value"), st.integers(0, 100), st.one_of(
            json_values, st.sampled_from(["model.safetensors", "../hf/model.safetensors", "/dev/zero", ".", "",
                                          "model-00001-of-00002.safetensors", "config.json"])),),
        st.tuples(st.just("key"), st.integers(0, 100), st.text(max_size=30)),
        st.tuples(st.just("map"), st.integers(0, 0), json_values),
        st.tuples(st.just("bytes"), st.integers(0, 0), edits),
    ), min_size=1, max_size=4)

    @fuzz("sharded-index", index_edits)
    def test_fuzz_sharded_index(s: Seeds, ops):
        """model.safetensors.index.json of a sharded folder: shard names, tensor names, types."""
        index = json.loads(json.dumps(s.index))
        text = None
        for kind, i, val in ops:
            wm = index.get("weight_map") if isinstance(index, dict) else None
            keys = list(wm) if isinstance(wm, dict) else []
            if kind == "value" and keys:
                wm[keys[i % len(keys)]] = val
            elif kind == "key" and keys:
                wm[val] = wm.pop(keys[i % len(keys)])
            elif kind == "map" and isinstance(index, dict):
                index["weight_map"] = val
            elif kind == "bytes":
                text = mutate(json.dumps(index).encode(), val)
        d = _hf_copy(s, s.sharded)
        (d / "model.safetensors.index.json").write_bytes(text if text is not None else json.dumps(index).encode())
        check(s, d, "sharded-index")
        s.done(d.parent)
