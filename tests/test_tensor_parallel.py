"""Tensor parallelism over gloo on the CPU: two worker processes give TP=1's tokens."""

import gzip
import json
import os
import signal
import time

import pytest

from albireo import LLM, SamplingParams
from albireo.executor.executor import WorkerDiedError
from albireo.profiling.worker_profile import ENV, TRACE_ENV

from conftest import TINY_MODELS, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("tp,name", [(2, name) for name in TINY_MODELS] + [(4, "llama"), (4, "qwen3"),
                                                                           (8, "llama-8-heads")])
def test_tp_greedy_equals_tp1(tiny_model, tp, name):
    """qwen3's tiny model has one KV head and llama's two: ranks past the KV heads hold replicas."""
    path = tiny_model(name)
    prompts = random_prompts(4, seed=2)
    expected = [o.outputs[0].token_ids for o in LLM(path).generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(path, tensor_parallel_size=tp)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == expected


MIXED = [
    SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=1.0, seed=8, max_tokens=9, ignore_eos=True, logprobs=1),
]


def outputs(llm: LLM, prompts, params) -> list:
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = None if c.logprobs is None else [{t: round(lp.logprob, 4) for t, lp in step.items()} for step in c.logprobs]
        result.append((c.token_ids, lps))
    return result


@pytest.mark.parametrize("tp_sampling", ["seq_parallel", "all_gather"])
def test_tp2_seeded_sampling_and_logprobs_equal_tp1(tiny_model, tp_sampling):
    """Five rows over two ranks: the seq-parallel path pads the batch to a multiple of t."""
    path = tiny_model("llama")
    prompts = random_prompts(5, seed=3)
    params = [MIXED[i % len(MIXED)] for i in range(len(prompts))]
    expected = outputs(LLM(path), prompts, params)
    assert outputs(LLM(path, tensor_parallel_size=2, tp_sampling=tp_sampling), prompts, params) == expected


def test_a_killed_worker_fails_the_engine_with_its_rank_and_leaves_no_process(tiny_model):
    llm = LLM(tiny_model("llama"), tensor_parallel_size=2)
    procs = list(llm.engine.core.executor.workers.procs.values())
    os.kill(procs[1].pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match="rank 1"):
        llm.generate(random_prompts(2, seed=1), GREEDY, use_tqdm=False)
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.is_alive() for p in procs)


def test_rank0_profiles_the_steps_asked_for_through_the_environment(tiny_model, tmp_path, monkeypatch):
    table = tmp_path / "rank0.txt"
    monkeypatch.setenv(ENV, f"2:3:{table}")
    llm = LLM(tiny_model("llama"), tensor_parallel_size=2)
    try:
        llm.generate(random_prompts(2, seed=1), GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    text = table.read_text()
    assert text.startswith("rank 0, 3 steps") and "aten::" in text


def test_every_rank_writes_its_own_trace_when_asked(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, f"1:2:{tmp_path / 'rank0.txt'}")
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "steps.json.gz"))
    llm = LLM(tiny_model("llama"), tensor_parallel_size=2)
    try:
        llm.generate(random_prompts(2, seed=1), GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    for name in ("steps.json.gz", "steps.rank1.json.gz"):
        with gzip.open(tmp_path / name, "rt") as f:
            assert json.load(f)["traceEvents"]
