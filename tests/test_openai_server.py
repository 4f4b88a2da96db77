"""`albireo serve` for real: a server subprocess on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

API_KEY = "sk-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    """The pids still alive after up to `timeout` seconds (the resource tracker exits on its own)."""
    deadline = time.monotonic() + timeout
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid`, read from /proc."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found += kids
        frontier += kids
    return found


class Server:
    def __init__(self, model: str, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "albireo.entrypoints.cli", "serve", model, "--port", str(self.port),
               "--device", "cpu", "--cpu-kv-cache-gb", "0.02", "--max-model-len", "256", "--log-level", "warning",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def aborted(self) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        m = re.search(r'^albireo_request_success_total{[^}]*finished_reason="abort"[^}]*} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model(), "--api-key", API_KEY, "--served-model-name", "tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def _post(server: Server, path: str, body, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (str, bytes)):
        return httpx.post(f"{server.url}{path}", content=body, headers={**headers, "content-type": "application/json"})
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, **kw)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_completion(client):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert isinstance(r.choices[0].text, str)


def test_chat_streamed_equals_plain(client):
    plain = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_n2_stop_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt="The quick", max_tokens=5, n=2, temperature=1.0, seed=3,
                                  logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 5
        assert all(len(top) <= 2 + 1 for top in c.logprobs.top_logprobs)
    full = client.completions.create(model="tiny", prompt="The quick", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[3:5]
    if stop.strip():
        cut = client.completions.create(model="tiny", prompt="The quick", max_tokens=10, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_50_concurrent_streams(server):
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

    async def one(i: int) -> int:
        stream = await aclient.completions.create(
            model="tiny", prompt=f"Number {i} and", max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(50)))
        finally:
            await aclient.close()

    assert asyncio.run(main()) == [4] * 50


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "tiny", "prompt": "The quick", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # a few chunks, then hang up
    assert any(line.startswith("data: {") for line in got)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("albireo_num_requests_running") == 0 and server.metric("albireo_kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    assert server.metric("albireo_num_requests_running") == 0
    assert server.metric("albireo_kv_cache_usage_perc") == 0
    assert server.aborted() >= 1


def test_disconnect_while_waiting_for_a_plain_response_aborts(server):
    body = {"model": "tiny", "prompt": "The quick", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    aborted = server.aborted()
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/completions", body, timeout=0.3)
    deadline = time.monotonic() + 10
    while server.metric("albireo_num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("albireo_num_requests_running") == 0
    assert server.metric("albireo_kv_cache_usage_perc") == 0
    assert server.aborted() == aborted + 1  # it did not just run to its end


def _error(r: httpx.Response, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err["message"]


def test_errors(server):
    _error(_post(server, "/v1/completions", "{not json"), 400)
    _error(_post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model")
    msg = _error(_post(server, "/v1/completions", {"model": "tiny", "prompt": "The quick brown fox " * 80}), 400,
                 "prompt")
    assert "max_model_len is 256" in msg
    _error(_post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}), 400, "temperature")
    _error(_post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}), 400, "top_p")
    _error(_post(server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "n": 0}), 400, "n")
    _error(_post(server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_completion_tokens": 999}),
           400, "max_tokens")
    _error(_post(server, "/v1/chat/completions", {"model": "tiny", "messages": "hi"}), 400, "messages")
    # The API key guards /v1; health stays open for probes.
    _error(_post(server, "/v1/completions", {"model": "tiny", "prompt": "x"}, key=None), 401)
    _error(_post(server, "/v1/completions", {"model": "tiny", "prompt": "x"}, key="wrong"), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert models["data"][0]["id"] == "tiny"
    assert "version" in httpx.get(f"{server.url}/version").json()
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("albireo_time_to_first_token_seconds", "albireo_inter_token_latency_seconds",
                 "albireo_time_per_output_token_seconds", "albireo_prompt_tokens_total",
                 "albireo_generation_tokens_total", "albireo_num_requests_waiting"):
        assert name in metrics


def test_queue_limit_dead_engine_and_sigterm(tiny_model):
    s = Server(tiny_model(), "--max-num-seqs", "1", "--max-queue", "1", "--graceful-shutdown-timeout", "1")
    try:
        long = {"model": tiny_model(), "prompt": "The quick", "max_tokens": 240, "temperature": 0,
                "ignore_eos": True}
        # A runs; B waits behind it (max_num_seqs 1); C finds the queue full.
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, _post(s, "/v1/completions", long,
                                                                                      timeout=60)))
                   for k in ("a", "b")]
        threads[0].start()
        deadline = time.monotonic() + 20
        while s.metric("albireo_num_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        threads[1].start()
        while s.metric("albireo_num_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = _post(s, "/v1/completions", {"model": tiny_model(), "prompt": "x", "max_tokens": 1})
        _error(r, 429)
        assert r.headers["retry-after"] == "1"
        # The core process dies: requests in flight fail, new ones get 503, health says so.
        core = [p for p in _children(s.proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(core) == 1
        os.kill(core[0], signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert {results["a"].status_code, results["b"].status_code} <= {200, 503}
        _error(_post(s, "/v1/completions", {"model": tiny_model(), "prompt": "x", "max_tokens": 1}), 503)
        assert httpx.get(f"{s.url}/health").status_code == 503
        children = _children(s.proc.pid)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once shut down
        assert not _wait_gone(children)
    finally:
        s.stop()


def test_bench_serve(server, tmp_path):
    import json

    from albireo.entrypoints.cli import main

    main(["bench", "serve", "--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "6", "--input-len", "8",
          "--output-len", "3", "--request-rate", "50", "--max-concurrency", "4", "--out-dir", str(tmp_path)])
    (record_path,) = tmp_path.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["completed"] == 6 and record["failed"] == 0
    assert record["ttft_ms"]["p50"] > 0 and record["output_tokens_per_s"] > 0
    assert record_path.with_suffix(".png").stat().st_size > 0


def test_sigterm_lets_in_flight_requests_finish(server):
    """Last in the module: it stops the shared server."""
    result = {}
    body = {"model": "tiny", "prompt": "The quick", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    t = threading.Thread(target=lambda: result.setdefault("r", _post(server, "/v1/completions", body, timeout=60)))
    t.start()
    deadline = time.monotonic() + 20
    while server.metric("albireo_num_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    children = _children(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert result["r"].status_code == 200
    assert result["r"].json()["usage"]["completion_tokens"] == 30
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    assert not _wait_gone(children)
