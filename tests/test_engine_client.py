"""The engine core in its own process: same outputs as in-process, aborts, startup errors, death."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal

import pytest

from albireo.config import CacheConfig, EngineConfig, ModelConfig
from albireo.engine.async_llm import AsyncLLMEngine
from albireo.engine.client import EngineDeadError, MPClient
from albireo.engine.llm_engine import LLMEngine
from albireo.entrypoints.llm import LLM
from albireo.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "What is the capital of France?", "Paged attention stores"]


def _config(path: str, **cache) -> EngineConfig:
    return EngineConfig(model=ModelConfig(path), cache=CacheConfig(cpu_kv_cache_gb=0.01, **cache), device="cpu")


@pytest.fixture(scope="module")
def async_engine(tiny_model):
    engine = AsyncLLMEngine(_config(tiny_model()))
    yield engine
    engine.shutdown()
    assert not engine.client.proc.is_alive()


def _run(engine: AsyncLLMEngine, coro):
    async def main():
        engine.start()
        return await coro

    return asyncio.run(main())


async def _final(engine: AsyncLLMEngine, request_id: str, prompt, params: SamplingParams):
    out = None
    async for out in engine.generate(request_id, prompt, params):  # noqa: B007 (its last value)
        pass
    return out


def test_process_client_matches_llm(tiny_model, async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=12, stop=["Paris"])
    expected = LLM(tiny_model(), device="cpu", cpu_kv_cache_gb=0.01).generate(PROMPTS, params, use_tqdm=False)

    async def all_at_once():
        return await asyncio.gather(
            *(_final(async_engine, f"eq-{i}", p, params) for i, p in enumerate(PROMPTS))
        )

    got = _run(async_engine, all_at_once())
    for e, g in zip(expected, got):
        assert g.finished
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].text == e.outputs[0].text
        assert g.outputs[0].finish_reason == e.outputs[0].finish_reason


def test_streaming_text_grows(async_engine):
    async def stream():
        texts = []
        async for out in async_engine.generate("grow", "The quick", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)):
            texts.append(out.outputs[0].text)
        return texts, out

    texts, out = _run(async_engine, stream())
    assert len(out.outputs[0].token_ids) == 8
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert texts[-1] == out.outputs[0].text


def test_abort_frees_the_request(async_engine):
    async def abort_early():
        gen = async_engine.generate("ab", "The quick", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        first = await gen.__anext__()
        assert not first.finished
        await gen.aclose()  # the consumer walks away: generate's finally aborts
        # The core reports its load after handling the abort.
        for _ in range(200):
            stats = async_engine.stats()
            if stats.num_running == 0 and stats.kv_usage == 0.0:
                return stats
            await asyncio.sleep(0.02)
        return async_engine.stats()

    stats = _run(async_engine, abort_early())
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_usage == 0.0
    assert "ab" not in async_engine.engine.requests
    assert async_engine.num_in_flight == 0


def test_startup_error_surfaces_with_its_message(tiny_model):
    config = _config(tiny_model(), num_blocks_override=1)
    with pytest.raises(ValueError, match="the KV cache has room for 1 blocks"):
        MPClient(config)


def test_sync_engine_over_process_client(tiny_model):
    config = _config(tiny_model())
    engine = LLMEngine(config, client=MPClient(config))
    try:
        engine.add_request("0", "The quick brown fox", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert len(outs[-1].outputs[0].token_ids) == 5
    finally:
        engine.shutdown()


def test_core_death_fails_pending_requests(tiny_model):
    engine = AsyncLLMEngine(_config(tiny_model()))
    try:
        async def die_mid_request():
            gen = engine.generate("x", "The quick", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
            await gen.__anext__()
            os.kill(engine.client.proc.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="died"):
                async for _ in gen:
                    pass
            with pytest.raises(EngineDeadError):
                await engine.generate("y", "The", SamplingParams(max_tokens=2)).__anext__()

        _run(engine, asyncio.wait_for(die_mid_request(), 30))
    finally:
        engine.shutdown()
    assert not engine.client.proc.is_alive()


def test_unreadable_core_output_fails_pending_requests(tiny_model, monkeypatch):
    """Any error reading the core's outputs (not only its death) ends the request with an error
    instead of leaving it waiting forever."""
    engine = AsyncLLMEngine(_config(tiny_model()))
    try:
        async def garbled_mid_request():
            gen = engine.generate("x", "The quick", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
            await gen.__anext__()

            def garbled(timeout=None):
                raise ValueError("cannot decode message")

            monkeypatch.setattr(engine.client, "get_outputs", garbled)
            with pytest.raises(EngineDeadError, match="cannot decode message"):
                async for _ in gen:
                    pass

        _run(engine, asyncio.wait_for(garbled_mid_request(), 30))
    finally:
        engine.shutdown()
