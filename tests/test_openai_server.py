"""`albireo serve` for real: a server subprocess on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from albireo.executor.executor import free_port

from processes import wait_gone

API_KEY = "sk-test"


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
        self.port = free_port()
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
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    def aborted(self) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        m = re.search(r'^albireo_request_success_total{[^}]*finished_reason="abort"[^}]*} (\S+)$', text, re.MULTILINE)
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
    if isinstance(body, str | bytes):
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
    stop = full[3:].strip()[:2]  # visible text from inside the completion
    assert stop, f"the greedy completion has no text to stop on: {full!r}"
    cut = client.completions.create(model="tiny", prompt="The quick", max_tokens=10, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


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
    # 64 samples of 240 tokens: long enough that the hang-up is seen before the request could end.
    body = {"model": "tiny", "prompt": "The quick", "max_tokens": 240, "n": 64, "temperature": 0, "ignore_eos": True}
    aborted = server.aborted()
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/completions", body, timeout=0.3)
    deadline = time.monotonic() + 10
    while (server.metric("albireo_num_requests_running") != 0 or server.aborted() == aborted) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("albireo_num_requests_running") == 0
    assert server.metric("albireo_kv_cache_usage_perc") == 0
    assert server.aborted() > aborted  # it did not just run to its end


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
                 "albireo_generation_tokens_total", "albireo_num_requests_waiting",
                 'albireo_prefix_cache_hit_tokens_total{model_name="tiny",tier="host"}'):
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
        assert not wait_gone(children)
    finally:
        s.stop()


def test_200_concurrent_streams_all_complete_exactly(server):
    """200 streams at once, completions and chat mixed: every one ends with exactly max_tokens tokens."""
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    async def one(i: int) -> tuple[int, int, str | None, int]:
        common = dict(model="tiny", max_tokens=3, temperature=0 if i % 2 else 0.8, seed=i, stream=True,
                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        if i % 3:
            stream = await aclient.completions.create(prompt=f"Request {i} says", **common)
        else:
            stream = await aclient.chat.completions.create(
                messages=[{"role": "user", "content": f"Request {i}: hello"}], **common)
        usage, finish, usage_chunks = None, None, 0
        async for chunk in stream:
            if chunk.usage is not None:
                usage, usage_chunks = chunk.usage, usage_chunks + 1
            for c in chunk.choices:
                finish = c.finish_reason or finish
        return i, usage.completion_tokens, finish, usage_chunks

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await aclient.close()

    t0 = time.monotonic()
    results = asyncio.run(main())
    assert [r[0] for r in results] == list(range(200))  # none lost
    assert [r[1:] for r in results] == [(3, "length", 1)] * 200
    assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 10
    while server.metric("albireo_num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("albireo_num_requests_running") == 0
    assert server.metric("albireo_kv_cache_usage_perc") == 0


# ---- property-based fuzzing of the request bodies -------------------------------------------------

# Text that may hold lone surrogates: JSON's "\\ud800" escapes decode to them on the server.
_TEXT = st.characters(codec=None, exclude_categories=()) | st.sampled_from(["\ud800", "\udfff"])

_JUNK_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "NaN", "nan", "inf", "-inf", "Infinity", "1e999", "3", "-1", "0x10", "null", "true",
                     "\x00", "\ud800", "😀" * 3]),
)
_JUNK = st.recursive(_JUNK_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=6)


def _field(valid, extra=st.nothing()):  # noqa: B008 (strategies are immutable)
    """Mostly a valid value, sometimes junk or an edge value."""
    return st.one_of(valid, valid, extra, _JUNK)


_INTS = st.sampled_from([-(2**63) - 1, -(2**63), -1, 0, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 10**9, 10**30])
_SAMPLING = {
    # Valid max_tokens stay tiny so the requests that succeed finish fast.
    "max_tokens": st.one_of(st.integers(1, 3), st.integers(1, 3), _INTS, st.just(255), _JUNK),
    "temperature": _field(st.floats(0, 2), st.sampled_from([-1, 1e308, -0.0, 1e-300])),
    "top_p": _field(st.floats(0.01, 1), st.sampled_from([0, 1.0000001, -1, 2])),
    "top_k": _field(st.integers(-1, 600), _INTS),
    "min_p": _field(st.floats(0, 1), st.sampled_from([-0.1, 1.5])),
    "n": _field(st.integers(1, 5), st.one_of(_INTS, st.sampled_from([129, 2**31, 2**40]))),
    "stop": _field(st.one_of(st.text(_TEXT, min_size=1, max_size=4), st.lists(st.text(_TEXT, min_size=1, max_size=4), max_size=3)),
                   st.one_of(st.lists(_JUNK_SCALAR, min_size=1, max_size=3), st.just([""]), st.just(""))),
    "seed": _field(st.integers(0, 2**32), _INTS),
    "presence_penalty": _field(st.floats(-2, 2), st.sampled_from([3, -3, 1e308])),
    "frequency_penalty": _field(st.floats(-2, 2), st.sampled_from([3, -3, 1e308])),
    "repetition_penalty": _field(st.floats(0.5, 2), st.sampled_from([0, -1, 1e308])),
    "min_tokens": _field(st.integers(0, 3), _INTS),
    "ignore_eos": _field(st.booleans()),
    "stop_token_ids": _field(st.lists(st.integers(0, 511), max_size=3), st.lists(_INTS, min_size=1, max_size=2)),
    "skip_special_tokens": _field(st.booleans()),
    "include_stop_str_in_output": _field(st.booleans()),
    "stream": _field(st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "model": st.one_of(st.just("tiny"), st.just("tiny"), st.just("nope"), _JUNK),
    "user": _JUNK, "logit_bias": _JUNK, "unknown_field": _JUNK,  # unknown fields are ignored
}
_COMPLETION = {
    **_SAMPLING,
    "prompt": _field(
        st.one_of(st.text(_TEXT, min_size=1, max_size=20), st.lists(st.text(_TEXT, max_size=10), max_size=3),
                  st.lists(st.integers(0, 511), max_size=8), st.lists(st.lists(st.integers(0, 511), max_size=4),
                                                                       max_size=3)),
        st.one_of(st.just("x " * 300), st.lists(st.one_of(st.integers(-5, 2**64), _JUNK_SCALAR), min_size=1,
                                                 max_size=4))),
    "logprobs": _field(st.integers(0, 5), st.one_of(_INTS, st.sampled_from([20, 511, 512, 513, 10**6]))),
    "echo": _field(st.booleans()),
}
_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
                           "content": st.one_of(st.text(_TEXT, max_size=20), st.none())}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "bot", "", "USER"]),
                           "content": st.one_of(st.lists(st.fixed_dictionaries(
                               {"type": st.sampled_from(["text", "image_url", ""]), "text": _JUNK}), max_size=2),
                               _JUNK)}),
    st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]), _JUNK, max_size=3),
    _JUNK,
)
_CHAT = {
    **_SAMPLING,
    "messages": _field(st.lists(_MESSAGE, min_size=1, max_size=3), st.one_of(st.just([]), st.just("hi"))),
    "max_completion_tokens": st.one_of(st.integers(1, 3), _INTS, _JUNK),
    "logprobs": _field(st.booleans()),
    "top_logprobs": _field(st.integers(0, 5), st.one_of(_INTS, st.sampled_from([-1, 20, 21, 512, 10**6]))),
    "add_generation_prompt": _field(st.booleans()),
}


def _bodies(fields: dict):
    """A body with any subset of the fields; chat's unbounded max_tokens is kept bounded when valid."""
    return st.fixed_dictionaries({}, optional=fields)


def _check_response(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], r.text
        assert "Traceback" not in err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text
        for e in events[:-1]:
            chunk = json.loads(e)
            if "error" in chunk:  # a stream may end in a 4xx-style error, never a server fault
                assert chunk["error"]["type"] not in ("InternalServerError", "ServiceUnavailableError"), chunk
    else:
        assert r.json()["choices"], r.text


def _fuzz_post(http: httpx.Client, path: str, body) -> httpx.Response:
    # Serialized by hand: json.dumps writes NaN/Infinity, which Python's parser on the server accepts.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    _check_response(r)
    return r


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as c:
        yield c


_FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


def _cap_chat(body):
    # A valid chat body without max_tokens would generate up to the context's end: keep it short.
    if isinstance(body, dict) and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2
    return body


@_FUZZ
@given(body=_bodies(_COMPLETION))
def test_fuzz_completions(http, body):
    _fuzz_post(http, "/v1/completions", body)


@_FUZZ
@given(body=_bodies(_CHAT).map(_cap_chat))
def test_fuzz_chat(http, body):
    _fuzz_post(http, "/v1/chat/completions", body)


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       raw=st.one_of(st.binary(max_size=64), st.text(max_size=30).map(str.encode),
                     st.sampled_from([b"", b"null", b"[]", b"1", b'"x"', b"{", b'{"prompt": }', b"\xff\xfe{}",
                                      b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}',
                                      b'{"prompt": "x", "max_tokens": 1e999}', b'{"prompt": "x"' + b"]" * 1000])))
def test_fuzz_raw_bytes(http, path, raw):
    _fuzz_post(http, path, raw)


def test_fuzz_regressions(http):
    """Bodies the fuzzing found: each once gave a 5xx or hung the server."""
    # A JSON "\\ud800" escape decodes to a lone surrogate; the tokenizer raised a TypeError (500).
    _error(_fuzz_post(http, "/v1/completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'), 400,
           "prompt")
    _error(_fuzz_post(http, "/v1/completions", {"prompt": ["ok", "a\udfffb"], "max_tokens": 2}), 400, "prompt")
    _error(_fuzz_post(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}],
                                                     "max_tokens": 2, "stream": True}), 400, "messages")
    # A huge n fanned out into that many requests inside the event loop: the server hung.
    for n in (129, 2**40):
        _error(_fuzz_post(http, "/v1/completions", {"prompt": "x", "max_tokens": 1, "n": n}), 400, "n")
        _error(_fuzz_post(http, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, "n": n}), 400, "n")


def test_engine_alive_after_fuzzing(server, http):
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = _fuzz_post(http, "/v1/completions", {"model": "tiny", "prompt": "The quick", "max_tokens": 2,
                                             "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 2


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


def test_bench_serve_takes_sharegpt_prompts(server, tmp_path):
    import json

    from albireo.entrypoints.cli import main

    conversations = [
        {"conversations": [{"from": "human", "value": "héllo wörld"}, {"from": "gpt", "value": "hi"}]},
        {"conversations": [{"from": "human", "value": "The quick brown fox"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn first: skipped"}]},
    ]
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(conversations))
    main(["bench", "serve", "--base-url", server.url, "--api-key", API_KEY, "--dataset", str(dataset),
          "--num-prompts", "5", "--output-len", "2", "--out-dir", str(tmp_path), "--no-plot"])
    (record_path,) = (p for p in tmp_path.glob("*.json") if p != dataset)
    record = json.loads(record_path.read_text())
    assert record["completed"] == 5 and record["failed"] == 0


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
    assert not wait_gone(children)


def test_prefix_cache_hit_counters_follow_the_core_totals():
    from albireo.engine.client import CoreStats
    from albireo.entrypoints.openai.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    metrics.render(CoreStats(prefix_hit_tokens=32))
    text = metrics.render(CoreStats(prefix_hit_tokens=48, host_hit_tokens=16)).decode()
    assert 'albireo_prefix_cache_hit_tokens_total{model_name="m",tier="device"} 48.0' in text
    assert 'albireo_prefix_cache_hit_tokens_total{model_name="m",tier="host"} 16.0' in text
