"""Tensor parallelism over gloo on the CPU: two worker processes give TP=1's tokens."""

import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from albireo import LLM, SamplingParams
from albireo.executor.executor import WorkerDiedError
from albireo.profiling.worker_profile import ENV
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


def _row_parallel_rank(rank, port, full_weight, x_full, results):
    from albireo.distributed import parallel_state as ps
    from albireo.layers.linear import RowParallelLinear

    ps.init_distributed(rank, 2, ps.Rendezvous("127.0.0.1", port), "gloo")
    ps.OVERLAP_MIN_CHUNK_ROWS = 2
    layer = RowParallelLinear(full_weight.shape[1], full_weight.shape[0])
    layer.weight.weight_loader(layer.weight, full_weight)
    x = x_full.narrow(1, rank * layer.local_input, layer.local_input)
    for i, chunks in enumerate([1, 3]):
        ps.set_all_reduce_overlap(chunks)
        assert ps.overlap_chunks(x, full_weight.shape[0]) == chunks
        results[rank][i].copy_(layer(x))
    ps.shutdown_distributed()


def test_row_parallel_layer_in_overlapped_chunks_sums_what_it_sums_whole():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(6, 8, generator=g), torch.randn(7, 8, generator=g)
    results = [[torch.empty(7, 6).share_memory_() for _ in range(2)] for _ in range(2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_row_parallel_rank, args=(r, port, weight, x, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    whole = results[0][0]
    torch.testing.assert_close(whole, x @ weight.t())
    for rank in range(2):
        assert torch.equal(results[rank][0], whole) and torch.equal(results[rank][1], whole)
