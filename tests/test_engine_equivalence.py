"""Engine features that must not change what is generated: prefix caching, chunked prefill, preemption."""

import pytest

from albireo import LLM, SamplingParams

from conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def shared_prefix_prompts() -> list[list[int]]:
    """Prompts that share long prefixes (so the prefix cache hits) mixed with unrelated ones."""
    system = random_prompts(1, seed=7, min_len=40, max_len=40)[0]
    tails = random_prompts(6, seed=8, min_len=1, max_len=30)
    return [system + t for t in tails] + random_prompts(4, seed=9, min_len=20, max_len=70)


def run(path: str, prompts, params=GREEDY, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, **engine_args)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.fixture(scope="module")
def baseline(tiny_model):
    path = tiny_model("llama")
    tokens, _ = run(path, shared_prefix_prompts(), enable_prefix_caching=False, enable_chunked_prefill=False,
                    max_num_batched_tokens=2048)
    return path, tokens


def test_prefix_caching_gives_same_tokens_and_hits(baseline):
    path, expected = baseline
    tokens, llm = run(path, shared_prefix_prompts(), enable_prefix_caching=True, max_num_seqs=2)
    assert tokens == expected
    assert llm.engine.core.scheduler.kv.num_prefix_hits > 0


def test_chunked_prefill_gives_same_tokens(baseline):
    path, expected = baseline
    tokens, _llm = run(path, shared_prefix_prompts(), enable_chunked_prefill=True, max_num_batched_tokens=16,
                       enable_prefix_caching=False)
    assert tokens == expected


def test_chunked_prefill_with_prefix_caching_gives_same_tokens(baseline):
    path, expected = baseline
    tokens, _ = run(path, shared_prefix_prompts(), enable_chunked_prefill=True, max_num_batched_tokens=24)
    assert tokens == expected


def test_tiny_kv_pool_preempts_and_gives_same_tokens(baseline):
    path, expected = baseline
    # 16 blocks of 16 tokens: enough for one 256-token sequence, far too few for ten at once.
    tokens, llm = run(path, shared_prefix_prompts(), num_kv_blocks=16, max_model_len=256)
    assert tokens == expected
    assert llm.engine.core.scheduler.num_preemptions > 0


def test_preemption_with_seeded_sampling_gives_same_tokens(tiny_model):
    path = tiny_model("llama")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True)
    prompts = shared_prefix_prompts()
    expected, _ = run(path, prompts, params)
    tokens, llm = run(path, prompts, params, num_kv_blocks=16, max_model_len=256, enable_prefix_caching=False)
    assert tokens == expected
    assert llm.engine.core.scheduler.num_preemptions > 0


def test_block_size_does_not_change_tokens(baseline):
    path, expected = baseline
    tokens, _ = run(path, shared_prefix_prompts(), block_size=4)
    assert tokens == expected


MIXED_PARAMS = [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=25, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=30, min_tokens=4, stop_token_ids=[100, 200, 300]),
    SamplingParams(temperature=1.0, top_k=20, seed=9, max_tokens=12, ignore_eos=True, logprobs=2),
]


def mixed_run(path: str, **engine_args) -> list:
    prompts = shared_prefix_prompts()
    params = [MIXED_PARAMS[i % len(MIXED_PARAMS)] for i in range(len(prompts))]
    outs = LLM(path, **engine_args).generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs]


@pytest.mark.parametrize(
    "engine_args",
    [
        {},
        {"max_num_batched_tokens": 16},  # chunked prefill in the mix
        {"num_kv_blocks": 16, "max_model_len": 256},  # preemption in the mix
    ],
    ids=["plain", "chunked-prefill", "preemption"],
)
def test_async_scheduling_gives_the_same_outputs_as_sync(tiny_model, engine_args):
    path = tiny_model("llama")
    sync = mixed_run(path, async_scheduling=False, **engine_args)
    assert mixed_run(path, async_scheduling=True, **engine_args) == sync


def test_async_scheduling_honours_stop_strings_like_sync(tiny_model):
    path = tiny_model("llama")
    prompts = shared_prefix_prompts()
    probe = LLM(path, async_scheduling=False).generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].text
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[probe[6:9]])
    texts = {}
    for mode in (False, True):
        outs = LLM(path, async_scheduling=mode).generate(prompts, params, use_tqdm=False)
        texts[mode] = [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]
    assert texts[True] == texts[False]
    assert texts[True][0][1] == "stop"


def test_async_scheduling_with_penalties_gives_the_same_outputs_as_sync(tiny_model):
    path = tiny_model("llama")
    params = SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    runs = [run(path, shared_prefix_prompts(), params, async_scheduling=mode)[0] for mode in (False, True)]
    assert runs[0] == runs[1]


def run_chats(path: str, **engine_args) -> tuple[list[list[int]], LLM]:
    """Three rounds of four conversations on one system prompt; each round's prompt is the whole
    conversation so far (system, then user and assistant turns)."""
    llm = LLM(path, **engine_args)
    system = random_prompts(1, seed=30, min_len=40, max_len=40)[0]
    chats = [list(system) for _ in range(4)]
    tokens = []
    try:
        for r in range(3):
            chats = [c + u for c, u in zip(chats, random_prompts(4, seed=31 + r, min_len=8, max_len=20))]
            outs = [o.outputs[0].token_ids for o in llm.generate(chats, GREEDY, use_tqdm=False)]
            chats = [c + o for c, o in zip(chats, outs)]
            tokens += outs
    finally:
        llm.engine.shutdown()
    return tokens, llm


@pytest.mark.parametrize("tp", [1, 2])
def test_host_kv_tier_gives_same_tokens_with_blocks_cycling_through_it(tiny_model, tp):
    """A 12-block device pool holds about two conversations: the others come back from the host tier."""
    path = tiny_model("llama")
    expected, _ = run_chats(path, num_kv_blocks=12, max_model_len=192)
    tokens, llm = run_chats(path, num_kv_blocks=12, max_model_len=192, kv_offload_gb=0.01, tensor_parallel_size=tp)
    assert tokens == expected
    assert llm.engine.core.scheduler.kv.num_host_hits > 0
    if tp == 1:
        stats = llm.engine.core.executor.worker.runner.offload.stats
        assert stats.blocks_saved > 0 and stats.blocks_loaded == llm.engine.core.scheduler.kv.num_host_hits // 16


def test_host_kv_tier_gives_same_tokens_over_an_fp8_kv_cache(tiny_model):
    """The host tier keeps a float8 block's bytes as they are: what comes back is what was stored."""
    path = tiny_model("llama")
    expected, _ = run_chats(path, num_kv_blocks=12, max_model_len=192, kv_cache_dtype="fp8")
    tokens, llm = run_chats(path, num_kv_blocks=12, max_model_len=192, kv_cache_dtype="fp8", kv_offload_gb=0.01)
    assert tokens == expected
    assert llm.engine.core.scheduler.kv.num_host_hits > 0


def _recorded_plans(llm: LLM) -> list[list[int]]:
    """Each step's scheduled token counts, in plan order, from here on."""
    plans, scheduler = [], llm.engine.core.scheduler
    schedule = scheduler.schedule

    def recording():
        plan = schedule()
        plans.append(list(plan.num_scheduled_tokens.values()))
        return plan

    scheduler.schedule = recording
    return plans


def test_generate_queueing_prompts_as_steps_run_plans_the_steps_of_queueing_all_first(tiny_model):
    # generate() checks and queues its prompts two steps' worth at a time while steps run.
    prompts = random_prompts(12, seed=3, min_len=5, max_len=40)
    args = dict(max_num_batched_tokens=32, max_num_seqs=4, enable_prefix_caching=False)
    fed = LLM(tiny_model("llama"), **args)
    fed_plans = _recorded_plans(fed)
    fed_tokens = [o.outputs[0].token_ids for o in fed.generate(prompts, GREEDY, use_tqdm=False)]

    upfront = LLM(tiny_model("llama"), **args)
    upfront_plans = _recorded_plans(upfront)
    for i, p in enumerate(prompts):
        upfront.engine.add_request(str(i), p, GREEDY)
    done = {}
    while upfront.engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0].token_ids) for o in upfront.engine.step() if o.finished)
    assert fed_plans == upfront_plans and len(fed_plans) > 10
    assert fed_tokens == [done[str(i)] for i in range(len(prompts))]
