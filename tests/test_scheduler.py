"""Scheduler driven by hand: plans from schedule(), fake sampled tokens into update_from_output()."""

from __future__ import annotations

import pytest

from albireo.config import CacheConfig, SchedulerConfig
from albireo.core.scheduler import NewRequestData, SampledTokens, Scheduler, SchedulerOutput
from albireo.engine.request import Request, RequestStatus
from albireo.sampling_params import SamplingParams

BS = 4
EOS = 2


def make_scheduler(
    num_blocks: int = 64,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    chunked: bool = True,
    caching: bool = True,
    max_model_len: int = 1024,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs, max_num_batched_tokens, chunked),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_blocks,
        max_model_len,
    )


def make_request(req_id: str, num_prompt: int, start: int = 100, max_tokens: int = 100, **params) -> Request:
    prompt = list(range(start, start + num_prompt))
    return Request(req_id, prompt, SamplingParams(**params), eos_token_ids=[EOS], max_tokens=max_tokens)


def sampling_ids(sched: Scheduler, plan: SchedulerOutput) -> list[str]:
    """Requests whose every known token is computed after this plan: those the runner samples for."""
    return [
        rid for rid in plan.num_scheduled_tokens
        if rid in sched.requests and sched.requests[rid].num_computed_tokens == sched.requests[rid].num_tokens
    ]


def step(sched: Scheduler, tokens: dict[str, int] | None = None, default: int = 7):
    """One engine step: plan, then sample `tokens[req_id]` (or `default`) for each request that samples."""
    plan = sched.schedule()
    ids = sampling_ids(sched, plan)
    tokens = tokens or {}
    outputs = sched.update_from_output(plan, SampledTokens(ids, [tokens.get(rid, default) for rid in ids]))
    return plan, {o.req_id: o for o in outputs}


def new_data(plan: SchedulerOutput, req_id: str) -> NewRequestData:
    [data] = [d for d in plan.new_requests if d.req_id == req_id]
    return data


# ---- budget and seats --------------------------------------------------------------------------


def test_schedule_respects_the_token_budget():
    sched = make_scheduler(max_num_batched_tokens=10)
    for rid in "abc":
        sched.add_request(make_request(rid, 6, start=ord(rid) * 10))
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"a": 6, "b": 4}
    assert plan.total_num_scheduled_tokens == 10
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_running_decodes_share_the_budget_before_new_prompts():
    sched = make_scheduler(max_num_batched_tokens=10)
    for rid in "ab":
        sched.add_request(make_request(rid, 3, start=ord(rid) * 10))
    step(sched)
    sched.add_request(make_request("c", 20))
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1, "c": 8}


def test_schedule_respects_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, 3, start=ord(rid) * 10))
    plan = sched.schedule()
    assert list(plan.num_scheduled_tokens) == ["a", "b"]
    assert sched.num_running == 2
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_waiting_request_takes_a_seat_freed_by_a_finished_one():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("a", 3, max_tokens=1))
    sched.add_request(make_request("b", 3, start=200))
    plan, outs = step(sched)
    assert list(plan.num_scheduled_tokens) == ["a"]
    assert outs["a"].finish_reason == "length"
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"b": 3}
    assert plan.finished_req_ids == {"a"}


# ---- chunked prefill ---------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_while_a_decode_gets_one_token_per_step():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("d", 3))
    step(sched)
    long_req = make_request("long", 20, start=500)
    sched.add_request(long_req)

    plans = [step(sched) for _ in range(3)]
    assert [p.num_scheduled_tokens for p, _ in plans] == [
        {"d": 1, "long": 7},
        {"d": 1, "long": 7},
        {"d": 1, "long": 6},
    ]
    assert [sorted(outs) for _, outs in plans] == [["d"], ["d"], ["d", "long"]]
    assert long_req.num_computed_tokens == 20
    assert long_req.output_token_ids == [7]


def test_a_prefill_chunk_continues_as_a_cached_request_with_its_progress():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("long", 20))
    first = sched.schedule()
    assert [d.req_id for d in first.new_requests] == ["long"]
    assert new_data(first, "long").block_ids == [0, 1]
    second = sched.schedule()
    assert second.new_requests == []
    [cached] = second.cached_requests
    assert (cached.req_id, cached.num_computed_tokens, cached.new_block_ids) == ("long", 8, [2, 3])


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits_and_blocks_later_ones():
    sched = make_scheduler(max_num_batched_tokens=10, chunked=False)
    sched.add_request(make_request("a", 6))
    sched.add_request(make_request("b", 6, start=200))
    sched.add_request(make_request("c", 2, start=300))  # would fit in the 4 tokens left
    plan, _ = step(sched)
    assert plan.num_scheduled_tokens == {"a": 6}
    assert [r.request_id for r in sched.waiting] == ["b", "c"]

    plan, _ = step(sched)
    assert plan.num_scheduled_tokens == {"a": 1, "b": 6, "c": 2}


def test_with_chunked_prefill_the_same_prompt_is_split_to_fill_the_budget():
    sched = make_scheduler(max_num_batched_tokens=10, chunked=True)
    sched.add_request(make_request("a", 6))
    sched.add_request(make_request("b", 6, start=200))
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"a": 6, "b": 4}


# ---- preemption --------------------------------------------------------------------------------


def fill_pool_with_two_decodes(a_max_tokens: int = 100) -> Scheduler:
    """4 blocks, a and b each hold 2 and have 8 tokens computed: the next decode needs a new block."""
    sched = make_scheduler(num_blocks=4)
    sched.add_request(make_request("a", 7, max_tokens=a_max_tokens))
    sched.add_request(make_request("b", 7, start=200))
    step(sched, {"a": 11, "b": 21})
    step(sched, {"a": 12, "b": 22})
    assert sched.kv.pool.num_free == 0
    return sched


def test_preemption_takes_the_most_recently_admitted_request():
    sched = fill_pool_with_two_decodes()
    b = sched.requests["b"]
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"a": 1}
    assert b.status == RequestStatus.PREEMPTED
    assert sched.num_preemptions == 1
    assert sched.running == [sched.requests["a"]]


def test_preempted_request_loses_its_blocks_and_progress():
    sched = fill_pool_with_two_decodes()
    b = sched.requests["b"]
    assert sched.kv.block_ids("b") == [2, 3]
    sched.schedule()
    assert b.num_computed_tokens == 0
    assert "b" not in sched.kv.req_blocks
    # b's blocks were released tail first, so a's new block is b's old tail and b's head stays idle.
    assert sched.kv.block_ids("a") == [0, 1, 3]
    assert list(sched.kv.pool.free) == [2]
    assert sched.kv.pool.ref_counts == [1, 1, 0, 1]
    assert b.output_token_ids == [21, 22]  # what it produced is kept for the recompute


def test_preempted_request_goes_to_the_front_of_waiting():
    sched = fill_pool_with_two_decodes()
    sched.add_request(make_request("c", 3, start=300))
    sched.schedule()
    assert [r.request_id for r in sched.waiting] == ["b", "c"]


def test_preempted_request_is_listed_in_the_plan_that_preempts_it():
    sched = fill_pool_with_two_decodes()
    plan = sched.schedule()
    assert plan.finished_req_ids == {"b"}
    assert "b" not in plan.num_scheduled_tokens


def test_preemption_skips_requests_admitted_earlier():
    sched = make_scheduler(num_blocks=6)
    for rid, start in (("a", 100), ("b", 200), ("c", 300)):
        sched.add_request(make_request(rid, 7, start=start))
    step(sched)
    step(sched)
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1}
    assert sched.requests["c"].status == RequestStatus.PREEMPTED
    assert sched.requests["b"].status == RequestStatus.RUNNING


def test_last_running_request_short_of_blocks_preempts_itself():
    sched = make_scheduler(num_blocks=2)
    sched.add_request(make_request("a", 7))
    step(sched)
    step(sched)
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {}
    assert plan.finished_req_ids == {"a"}
    assert [r.request_id for r in sched.waiting] == ["a"]


def test_preempted_request_resumes_as_new_request_with_its_output_tokens():
    sched = fill_pool_with_two_decodes(a_max_tokens=3)
    plan, outs = step(sched, {"a": 13})  # b preempted; a finishes by length and frees its blocks
    assert outs["a"].finish_reason == "length"

    plan = sched.schedule()
    data = new_data(plan, "b")
    b = sched.requests["b"]
    assert data.prompt_token_ids == list(range(200, 207))
    assert data.output_token_ids == [21, 22]
    # Its first block is still cached; the rest of its 9 tokens are recomputed.
    assert data.num_computed_tokens == BS
    assert plan.num_scheduled_tokens == {"b": 9 - BS}
    assert b.status == RequestStatus.RUNNING
    assert b.num_computed_tokens == 9
    assert sched.kv.block_ids("b") == data.block_ids
    assert len(data.block_ids) == 3


def test_resumed_request_counts_earlier_outputs_towards_max_tokens():
    sched = make_scheduler(num_blocks=4)
    sched.add_request(make_request("a", 7, max_tokens=3))
    sched.add_request(make_request("b", 7, start=200, max_tokens=3))
    step(sched)
    step(sched)
    step(sched)  # b preempted with 2 outputs, a finishes
    _, outs = step(sched, {"b": 23})
    assert outs["b"].finish_reason == "length"
    assert outs["b"].new_token_ids == [23]


# ---- stop conditions ---------------------------------------------------------------------------


def run_one(req: Request, tokens: list[int], max_model_len: int = 1024):
    """Feed `tokens` to a lone request, one per step; the outputs until it finishes."""
    sched = make_scheduler(max_model_len=max_model_len)
    sched.add_request(req)
    outs = []
    for token in tokens:
        _, by_id = step(sched, {req.request_id: token})
        outs.append(by_id[req.request_id])
        if outs[-1].finished:
            break
    return sched, outs


def test_eos_stops_the_request():
    req = make_request("a", 3)
    sched, outs = run_one(req, [5, EOS, 6])
    assert [o.new_token_ids for o in outs] == [[5], [EOS]]
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].stop_reason is None
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert not sched.has_unfinished_requests()


def test_ignore_eos_keeps_generating_past_eos():
    req = make_request("a", 3, ignore_eos=True)
    _, outs = run_one(req, [EOS, EOS, 5])
    assert [o.finish_reason for o in outs] == [None, None, None]
    assert req.output_token_ids == [EOS, EOS, 5]


def test_stop_token_id_stops_with_it_as_stop_reason():
    req = make_request("a", 3, stop_token_ids=[9])
    _, outs = run_one(req, [5, 9, 6])
    assert len(outs) == 2
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].stop_reason == 9


def test_stop_token_id_applies_even_with_ignore_eos():
    req = make_request("a", 3, stop_token_ids=[9], ignore_eos=True)
    _, outs = run_one(req, [9])
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", 9)


def test_min_tokens_suppresses_eos_until_reached():
    req = make_request("a", 3, min_tokens=3)
    _, outs = run_one(req, [EOS, EOS, EOS, 5])
    assert [o.finish_reason for o in outs] == [None, None, "stop"]


def test_min_tokens_suppresses_stop_token_ids_until_reached():
    req = make_request("a", 3, min_tokens=2, stop_token_ids=[9])
    _, outs = run_one(req, [9, 9, 5])
    assert [o.finish_reason for o in outs] == [None, "stop"]
    assert outs[-1].stop_reason == 9


def test_max_tokens_finishes_with_length():
    req = make_request("a", 3, max_tokens=2)
    _, outs = run_one(req, [5, 6, 7])
    assert [o.finish_reason for o in outs] == [None, "length"]
    assert outs[-1].stop_reason is None
    assert req.status == RequestStatus.FINISHED_LENGTH


def test_eos_on_the_last_allowed_token_is_a_stop_not_length():
    req = make_request("a", 3, max_tokens=2)
    _, outs = run_one(req, [5, EOS])
    assert outs[-1].finish_reason == "stop"


def test_max_model_len_finishes_with_length():
    req = make_request("a", 6, max_tokens=100)
    _, outs = run_one(req, [5, 6, 7], max_model_len=8)
    assert [o.finish_reason for o in outs] == [None, "length"]
    assert req.num_tokens == 8


def test_finished_request_frees_its_blocks_and_is_listed_once():
    sched = make_scheduler(num_blocks=8)
    sched.add_request(make_request("a", 5, max_tokens=1))
    step(sched)
    assert sched.kv.pool.num_free == 8
    assert "a" not in sched.requests
    assert sched.schedule().finished_req_ids == {"a"}
    assert sched.schedule().finished_req_ids == set()


# ---- abort -------------------------------------------------------------------------------------


def test_abort_running_request_frees_blocks_and_is_listed_as_finished():
    sched = make_scheduler(num_blocks=8)
    req = make_request("a", 9)
    sched.add_request(req)
    step(sched)
    assert sched.kv.pool.num_free == 5
    sched.abort_requests(["a"])
    assert sched.kv.pool.num_free == 8
    assert req.status == RequestStatus.FINISHED_ABORTED
    assert sched.running == []
    assert "a" not in sched.requests
    plan = sched.schedule()
    assert plan.finished_req_ids == {"a"}
    assert plan.is_empty


def test_abort_waiting_request_removes_it_from_the_queue():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    sched.abort_requests(["a", "unknown"])
    assert not sched.has_unfinished_requests()
    assert sched.schedule().num_scheduled_tokens == {}


def test_tokens_for_a_request_aborted_while_its_step_ran_are_dropped():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    plan = sched.schedule()
    sched.abort_requests(["a"])
    assert sched.update_from_output(plan, SampledTokens(["a"], [5])) == []


# ---- progress and prefix cache -----------------------------------------------------------------


def test_num_computed_tokens_advances_at_schedule_time():
    sched = make_scheduler()
    req = make_request("a", 5)
    sched.add_request(req)
    plan = sched.schedule()
    assert req.num_computed_tokens == 5
    assert new_data(plan, "a").num_computed_tokens == 0
    sched.update_from_output(plan, SampledTokens(["a"], [7]))
    plan = sched.schedule()
    assert req.num_computed_tokens == 6
    assert plan.cached_requests[0].num_computed_tokens == 5


def test_prefix_cache_hit_schedules_fewer_tokens_for_an_identical_prompt():
    sched = make_scheduler()
    sched.add_request(make_request("a", 10))
    first, _ = step(sched)
    sched.add_request(make_request("b", 10))
    plan = sched.schedule()
    assert first.num_scheduled_tokens == {"a": 10}
    data = new_data(plan, "b")
    assert plan.num_scheduled_tokens["b"] == 2
    assert data.num_computed_tokens == 8
    assert data.block_ids[:2] == sched.kv.block_ids("a")[:2]
    assert data.block_ids[2] != sched.kv.block_ids("a")[2]


def test_without_prefix_caching_an_identical_prompt_is_computed_in_full():
    sched = make_scheduler(caching=False)
    sched.add_request(make_request("a", 10))
    step(sched)
    sched.add_request(make_request("b", 10))
    plan = sched.schedule()
    assert plan.num_scheduled_tokens["b"] == 10
    assert new_data(plan, "b").num_computed_tokens == 0


def test_duplicate_request_id_is_rejected():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a", 3))
    assert sched.num_waiting == 1
