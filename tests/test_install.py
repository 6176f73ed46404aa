"""The install itself (scripts/check_install builds dist/ and runs these with -m install; CI runs it).

Two fresh virtual environments outside the checkout, run from an unrelated folder with an empty
home, nothing of the checkout on any path:
- `fresh`: `pip install dist/meki_gguf-*.whl` into an environment without llama-cpp-python (pip
  installs the published binding as a dependency);
- `stock`: a stock llama-cpp-python installed first, then meki-gguf; the stock package must stay
  as it was and keep using its own llama.cpp. With MEKI_INSTALL_SDIST=1 (scripts/check_install
  --sdist) meki-gguf comes from the sdist, built there as pip does on a platform without a wheel;
  CI installs the wheel, which scripts/build_wheel built from that sdist.
Both install the `convert` extra. Each runs the demo, converts a checkpoint (byte-identical to
the checkout's file), generates (the checkout's greedy text), serves a request through
`meki-gguf llama-server`, and uninstalls leaving nothing behind.
- `runtime`: the wheel alone, as on a phone's Python: no torch, transformers or safetensors. It
  chats, generates, serves and runs the Python API; the converter's commands say which extra
  they need, in one line.
The install times and the environments' sizes are printed (-s).
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from meki_gguf import runtime
from meki_models import TINY, build, tokenizer

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
TORCH = "torch==2.13.0"          # scripts/install.sh's: the CPU build (this machine has its wheel)
PROMPT = "The capital of France is"


def dist_file(pattern: str) -> Path:
    files = sorted(DIST.glob(pattern))
    assert len(files) == 1, f"want one {pattern} in {DIST}, found {files}: run scripts/build_wheel"
    return files[0]


class Env:
    """A virtual environment and a clean environment to run its commands in."""

    def __init__(self, root: Path):
        self.root, self.work = root / "venv", root / "work"
        self.work.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "MEKI_LLAMA_BIN", "LLAMA_CPP_LIB_PATH", "VIRTUAL_ENV", "MEKI_GGUF_CACHE")}
        # an empty home (the demo's cache must go to XDG_CACHE_HOME), but pip's own cache: the
        # llama-cpp-python wheel pip builds from its sdist once is reused, as on a user's machine
        pip_cache = os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")
        self.env.update(HOME=str(root / "home"), XDG_CACHE_HOME=str(root / "home" / ".cache"),
                        PIP_CACHE_DIR=pip_cache, PATH=f"{self.root / 'bin'}:{os.environ['PATH']}")
        subprocess.run([sys.executable, "-m", "venv", self.root], check=True)

    def run(self, *args, timeout=1800, check=True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        r = subprocess.run([str(a) for a in args], cwd=self.work, capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check:
            assert r.returncode == 0, f"{args} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    def pip(self, *args, **kw):
        return self.run(self.root / "bin" / "python", "-m", "pip", *args, **kw)

    def python(self, code: str, **kw):
        return self.run(self.root / "bin" / "python", "-c", code, **kw)

    def site_packages(self) -> Path:
        return Path(self.python("import sysconfig; print(sysconfig.get_paths()['platlib'])").stdout.strip())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Megatron-LM checkpoint, its tokenizer, the checkout's GGUF of it and its greedy text."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = tokenizer(root / "tok")
    _, paths = build(root, tok, TINY, types=(("f32", "q8_0"),))
    gguf = paths["f32", "q8_0"]
    llm = runtime.load(gguf)
    text = llm.create_completion(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    return root / "megatron", tok, gguf, text


CONVERTER = ("torch", "transformers", "safetensors")


def installed(env: Env, spec: str, timings: dict, name: str):
    t = time.perf_counter()
    env.pip("install", spec)
    size = sum(f.stat().st_size for f in env.root.rglob("*") if f.is_file() and not f.is_symlink())
    timings[name] = f"{time.perf_counter() - t:.0f} s, environment {size / 2**20:.0f} MiB"


@pytest.fixture(scope="module")
def timings():
    t: dict[str, str] = {}
    yield t
    print("\ninstalls: " + "; ".join(f"{k}: {v}" for k, v in t.items()))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, timings):
    env = Env(tmp_path_factory.mktemp("fresh"))
    env.pip("install", TORCH)      # as a user who wants the CPU torch does first
    installed(env, f"{dist_file('meki_gguf-*.whl')}[convert]", timings, "wheel[convert] (after the CPU torch)")
    return env


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory, timings):
    env = Env(tmp_path_factory.mktemp("runtime"))
    installed(env, str(dist_file("meki_gguf-*.whl")), timings, "wheel, runtime only")
    return env


@pytest.fixture(scope="module")
def stock(tmp_path_factory, timings):
    env = Env(tmp_path_factory.mktemp("stock"))
    env.pip("install", TORCH, "llama-cpp-python==0.3.36")
    lib = env.site_packages() / "llama_cpp" / "lib"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in lib.iterdir()}
    assert "libllama.so" in before, f"the stock llama-cpp-python has no libllama: {sorted(before)}"
    sdist = os.environ.get("MEKI_INSTALL_SDIST") == "1"
    installed(env, f"{dist_file('meki_gguf-*.tar.gz' if sdist else 'meki_gguf-*.whl')}[convert]", timings,
              "sdist[convert]" if sdist else "wheel[convert] over a stock llama-cpp-python")
    env.stock_lib = (lib, before)
    return env


@pytest.fixture(params=["fresh", "stock"])
def env(request) -> Env:
    """An environment with the converter."""
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["fresh", "stock", "runtime_only"])
def any_env(request) -> Env:
    return request.getfixturevalue(request.param)


def test_runtime_only_has_no_converter_and_says_so(runtime_only, checkpoint):
    r = runtime_only.python(f"import importlib.util as u; print([m for m in {CONVERTER} if u.find_spec(m)])")
    assert r.stdout.strip() == "[]", r.stdout
    for args in (("convert", checkpoint[0], "-o", runtime_only.work / "m.gguf"), ("demo",),
                 ("export-hf", checkpoint[0], runtime_only.work / "hf")):
        r = runtime_only.run("meki-gguf", *args, check=False)
        print(f"\n{r.stderr.strip()}")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"`meki-gguf {args[0]}` needs the converter's packages: pip install 'meki-gguf[convert]' " \
               "(torch, transformers, safetensors not installed)" in r.stderr
    assert not (runtime_only.work / "m.gguf").exists() and not (runtime_only.work / "hf").exists()


def test_runtime_only_chats_and_generates(runtime_only, checkpoint):
    """The embedded trained model answers a chat turn; the checkout's file generates its text."""
    r = runtime_only.run("meki-gguf", "chat", "-n", 16, "--temp", 0, input="How do I read a file line by line?\n",
                         timeout=300)
    assert len(r.stdout.strip()) > 10, r.stdout + r.stderr
    r = runtime_only.run("meki-gguf", "generate", checkpoint[2], "-p", PROMPT, "-n", 12, "--temp", 0)
    assert checkpoint[3] in r.stdout, (checkpoint[3], r.stdout)
    r = runtime_only.run("meki-gguf", "inspect", checkpoint[2])
    assert "table" in r.stdout


def test_demo(env):
    r = env.run("meki-gguf", "demo", "-n", 8, "--n-chat", 8, timeout=600)
    assert "parity" in r.stdout.lower(), r.stdout
    assert (Path(env.env["XDG_CACHE_HOME"]) / "meki-gguf" / "demo").is_dir()


def test_convert_and_generate(env, checkpoint):
    megatron, tok, reference, text = checkpoint
    out = env.work / "m.gguf"
    env.run("meki-gguf", "convert", megatron, "-o", out, "--outtype", "f32", "--table-type", "q8_0",
            "--tokenizer", tok)
    assert out.read_bytes() == reference.read_bytes(), "the installed converter wrote another file than the checkout's"
    r = env.run("meki-gguf", "generate", out, "-p", PROMPT, "-n", 12, "--temp", 0)
    assert text in r.stdout, (text, r.stdout)


def test_python_api_and_tools(any_env, checkpoint):
    """runtime.load and llama_tool use the wheel's build; MEKI_LLAMA_BIN still overrides."""
    env = any_env
    gguf = checkpoint[2]
    r = env.python(
        "from meki_gguf import runtime, native; import llama_cpp\n"
        f"llm = runtime.load({str(gguf)!r})\n"
        f"print(llm.create_completion({PROMPT!r}, max_tokens=12, temperature=0)['choices'][0]['text'])\n"
        "print(llama_cpp.llama_cpp._lib._name)\n"
        "print(runtime.llama_tool('llama-server'))\n")
    text, lib, tool = r.stdout.rstrip("\n").split("\n")[-3:]
    assert text == checkpoint[3]
    pkg = env.site_packages() / "meki_gguf" / "llama" / "bin"
    assert Path(lib).parent == pkg and Path(tool) == pkg / "llama-server"
    r = env.python("from meki_gguf import runtime; print(runtime.llama_tool('llama-server'))",
                   env={**env.env, "MEKI_LLAMA_BIN": "/nowhere"}, check=False)
    assert "llama-server not found in /nowhere" in r.stderr


def test_llama_server(any_env, checkpoint):
    env, gguf = any_env, checkpoint[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(env.work / "server.log", "wb")
    proc = subprocess.Popen(["meki-gguf", "llama-server", "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                             "--no-webui"], cwd=env.work, env=env.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (env.work / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, (env.work / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        r = requests.post(f"http://127.0.0.1:{port}/completion", timeout=60,
                          json={"prompt": PROMPT, "n_predict": 12, "temperature": 0})
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 12, r.text
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_stock_binding_untouched(stock, checkpoint):
    """The stock llama-cpp-python kept its files, and without meki_gguf it uses its own llama.cpp,
    which refuses the MeKi file; a process that imports meki_gguf first runs it."""
    lib, before = stock.stock_lib
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in lib.iterdir()} == before
    r = stock.python("import llama_cpp\n"
                     "print(llama_cpp.llama_cpp._lib._name)\n"
                     f"llama_cpp.Llama({str(checkpoint[2])!r}, verbose=False)", check=False)
    assert r.returncode != 0 and r.stdout.strip().startswith(str(lib)), r.stdout + r.stderr
    r = stock.python("import llama_cpp, meki_gguf\n"
                     f"from meki_gguf import runtime; runtime.load({str(checkpoint[2])!r})", check=False)
    assert r.returncode != 0 and "llama_cpp was imported before meki_gguf" in r.stderr, r.stderr


def test_uninstall_leaves_nothing(any_env):
    """Run last in each environment (pytest runs the tests in file order)."""
    env = any_env
    site = env.site_packages()
    record = (next(site.glob("meki_gguf-*.dist-info")) / "RECORD").read_text()
    written = {str(p.relative_to(site)) for p in (site / "meki_gguf").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert written <= {line.split(",")[0] for line in record.splitlines()}, "files written next to the package"
    env.pip("uninstall", "-y", "meki-gguf")
    assert not (site / "meki_gguf").exists() and not list(site.glob("meki_gguf-*"))
    assert not (env.root / "bin" / "meki-gguf").exists()
