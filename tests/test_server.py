"""The patched llama-server serves a MeKi GGUF on loopback: its OpenAI-compatible chat endpoint
answers (plain and streamed), and its greedy tokens are Python's."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from meki_gguf import parity, runtime
from meki_models import build, tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tok = tokenizer(tmp_path_factory.mktemp("tok"))
    _, paths = build(tmp_path_factory.mktemp("model"), tok)
    return paths["f32", "f32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(model: Path, log: Path, *args: str):
    """A llama-server on a free loopback port with an f32 KV cache and no flash attention (exact
    comparisons), its log in `log`: yields (url, process) once /health answers; stopped after
    (SIGTERM: llama-server flushes its log as it exits, so `log` is whole when the block ends)."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([runtime.llama_tool("llama-server"), "-m", model, "--host", "127.0.0.1",
                                 "--port", str(port), "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-webui",
                                 *args], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"llama-server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, f"llama-server not healthy after 60 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "llama-server.log"
    with llama_server(model, log, "-c", "512", "-np", "1") as (url, _):
        yield url


MESSAGES = [{"role": "user", "content": "Hello! What is the capital of France?"}]


def test_chat_completions(server):
    r = requests.post(f"{server}/v1/chat/completions", timeout=60,
                      json={"messages": MESSAGES, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    print(f"\n{json.dumps(body)[:400]}")
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    assert 0 < body["usage"]["completion_tokens"] <= 16 and body["usage"]["prompt_tokens"] > 0


def test_chat_completions_streamed(server):
    r = requests.post(f"{server}/v1/chat/completions", timeout=60, stream=True,
                      json={"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "stream": True})
    assert r.status_code == 200, r.text
    events = [line[len(b"data: "):] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and len(chunks) > 1


def test_greedy_tokens_are_pythons(server, model):
    prompt = "The capital of France is"
    r = requests.post(f"{server}/completion", timeout=60,
                      json={"prompt": prompt, "n_predict": 16, "temperature": 0, "return_tokens": True})
    assert r.status_code == 200, r.text
    llm = parity.open_llama(model)
    ours, _ = parity.llama_greedy(llm, llm.tokenize(prompt.encode()), 16)
    assert r.json()["tokens"] == ours
