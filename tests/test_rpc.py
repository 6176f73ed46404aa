"""MeKi over llama.cpp's RPC backend (docs/DEVICES.md, "RPC"): two `rpc-server` processes on
loopback, the model's layers split across them (`llama-logits -ngl 99 --rpc A,B`), the client
holding the file.

- parity against the local CPU build: an f32 file (top-1 100%, max relative logit error <= 1e-5,
  32 greedy tokens identical) and a quantized one (top-1 >= 99%, mean KL <= 1e-3);
- placement from llama.cpp's own accounting: the RPC buffers hold the backbone only, the table
  stays mapped, lazy and prefetched on the client;
- the bytes on the sockets per decode token, MeKi against its dense twin, counted by a proxy in
  front of each server: the difference is the gathered rows (L*m*4 bytes a token, f32), which
  the client sends to the first server, and the second server's half of them once more, which
  travels from the first through the client (get, set). Before meki.cpp expanded the gather first,
  the first server's layers came in two graph splits around the host's gather, and RPC's graph
  cache (one graph per device) re-sent both graphs every token: 6.8x the dense bytes.

Everything is the real build (build/cmake/bin: rpc-server and llama-logits, GGML_RPC=ON).
"""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from meki_gguf import parity, runtime
from meki_gguf.quantize import quantize
from llama_logs import model_buffers
from meki_models import TINY, build

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "build" / "cmake" / "bin"
N_GEN = 32


class CountingProxy:
    """A loopback TCP proxy in front of one rpc-server that counts the bytes it forwards."""

    def __init__(self, upstream: int):
        self.upstream, self.sent, self.received = upstream, 0, 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:                                  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for a, b, to_server in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(a, b, to_server), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool):
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                with self.lock:
                    if to_server:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def total(self) -> int:
        with self.lock:
            return self.sent + self.received

    def close(self):
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers():
    """Two rpc-server processes, each behind a counting proxy; their endpoints as --rpc takes them."""
    exe = BIN / "ggml-rpc-server"                         # llama.cpp's rpc-server
    assert exe.is_file(), f"no {exe}: run scripts/install.sh (the build has GGML_RPC=ON)"
    procs, proxies = [], []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            deadline = time.time() + 60
            while True:
                assert procs[-1].poll() is None, procs[-1].stderr.read().decode()[-2000:]
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.time() < deadline, "rpc-server did not listen"
                    time.sleep(0.1)
            proxies.append(CountingProxy(port))
        yield proxies
    finally:
        for p in proxies:
            p.close()
        for p in procs:
            p.kill()
            p.wait()


def rpc_args(servers) -> list[str]:
    return ["-ngl", "99", "--rpc", ",".join(f"127.0.0.1:{p.port}" for p in servers)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("rpc")
    _, paths = build(root, tok, TINY, types=(("f32", "f32"), ("f16", "q8_0")))
    # two tiers (docs/FORMAT.md): a third of the rows in q8_0 by a random row order, the rest q4_0
    paths["f32", "q8_0+q4_0"] = quantize(paths["f32", "f32"], root / "tiers.gguf", "q8_0", cold_type="q4_0",
                                         hot_rows=TINY.vocab_size // 3,
                                         row_order=np.random.default_rng(0).permutation(TINY.vocab_size))
    return paths


def rpc_vs_cpu(path: Path, prompt: list[int], servers) -> parity.Parity:
    """The same sequence through the local CPU build and through the two servers."""
    cpu = parity.tool_greedy(BIN / "llama-logits", path, prompt, N_GEN)
    rpc = parity.tool_greedy(BIN / "llama-logits", path, prompt, N_GEN, forced=cpu[0][:-1], args=rpc_args(servers))
    return parity.against(prompt, rpc[0], rpc[1], cpu[1], cpu[0])


def test_rpc_f32_matches_the_cpu_build(files, prompt, servers):
    p = rpc_vs_cpu(files["f32", "f32"], prompt, servers)
    print(f"\nRPC (2 servers) vs CPU, f32 file: {p.summary()}")
    assert p.top1 == 1.0 and p.max_rel_err <= 1e-5 and p.greedy == p.greedy_ref


@pytest.mark.parametrize("types", [("f16", "q8_0"), ("f32", "q8_0+q4_0")], ids=["f16-q8_0", "f32-two-tier"])
def test_rpc_quantized_matches_the_cpu_build(files, prompt, servers, types):
    p = rpc_vs_cpu(files[types], prompt, servers)
    print(f"\nRPC (2 servers) vs CPU, {types[0]} backbone + {types[1]} table: {p.summary()}")
    assert p.top1_holds(parity.MIN_TOP1) and p.mean_kl <= parity.MAX_MEAN_KL


def test_rpc_buffers_hold_the_backbone_and_the_table_stays_on_the_client(big, prompt, servers):
    """A Qwen-sized vocabulary (a 148 MiB table, tests/conftest.py): llama.cpp's own accounting."""
    path = big
    _, tensors = runtime.read_header(path)
    mib = {name: t.nbytes / 2**20 for name, t in tensors.items()}
    table = mib.pop(runtime.TABLE)
    log = parity.tool_greedy(BIN / "llama-logits", path, prompt, 4, args=rpc_args(servers))[2]
    buffers = model_buffers(log)
    print(f"\nmodel buffers (MiB): {buffers}; table {table:.2f} MiB, backbone {sum(mib.values()):.2f} MiB")
    rpc = [size for dev, size in buffers if dev.startswith("RPC")]
    assert len(rpc) == 2 and all(size > 0 for size in rpc), "the layers are not split across both servers"
    assert ("CPU_Mapped", round(table, 2)) in buffers, "the table is not in a mapped host buffer"
    # the RPC buffers hold the backbone only: its layers and the output matrix (the tied embedding's
    # duplicate; the input embedding stays on the host with the input layer), never the table
    assert sum(rpc) <= sum(mib.values()) + 0.05 and sum(rpc) < table / 4
    assert "meki_mem.weight (size = " in log and "lazy read enabled" in log
    assert "enabling prefetch for 'meki_mem.weight'" in log


def test_rpc_bytes_per_decode_token_meki_vs_dense(tmp_path, tok, servers):
    """Decode steps only: the bytes of a run with 40 generated tokens less those of one with 8,
    per token, for a random MeKi model and its dense twin (the same backbone)."""
    from meki_gguf.synth import Shape, write_model
    from meki_gguf.tokenizer import tokenizer_kv

    meki = Shape("meki-rpc", n_layer=4, d=256, m=64, ff=512, n_head=4, n_kv_head=2, head_dim=64, vocab=384)
    kv = tokenizer_kv(tok, meki.vocab)
    paths = {s.name: write_model(s, tmp_path / f"{s.name}.gguf", "q8_0", "q8_0", tokenizer_kv=kv)
             for s in (meki, meki.dense())}
    prompt = list(range(10, 26))

    def bytes_of(path: Path, n: int) -> int:
        before = sum(p.total() for p in servers)
        parity.tool_greedy(BIN / "llama-logits", path, prompt, n, forced=[7] * (n - 1), args=rpc_args(servers))
        return sum(p.total() for p in servers) - before

    per_token = {}
    for name, path in paths.items():
        short, long = bytes_of(path, 8), bytes_of(path, 40)
        per_token[name] = (long - short) / 32
    rows = meki.n_layer * meki.m * 4
    extra = per_token["meki-rpc"] - per_token["dense-rpc"]
    print(f"\nbytes on the sockets per decode token: MeKi {per_token['meki-rpc']:.0f}, dense "
          f"{per_token['dense-rpc']:.0f}, difference {extra:.0f} (the gathered rows: L*m*4 = {rows})")
    # the rows go to the first server, where the layer-major copy is made; the second server's half
    # comes from there through the client (a get and a set): 2 * rows, plus the messages' headers
    assert rows <= extra <= 2 * rows + 1024, "more than the gathered rows"
