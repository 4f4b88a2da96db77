"""Sampling and stopping through the whole engine: seeds, stops, n, limits, logprobs."""

import math

import pytest

from albireo import LLM, SamplingParams

from conftest import random_prompts

PROMPTS = random_prompts(5, seed=3)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"))


def tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_same_seed_gives_same_tokens(llm):
    params = SamplingParams(temperature=0.8, top_k=50, seed=42, max_tokens=20, ignore_eos=True)
    assert tokens(llm, PROMPTS[:1], params) == tokens(llm, PROMPTS[:1], params)


def test_seeded_tokens_do_not_depend_on_the_rest_of_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=20, ignore_eos=True)
    alone = tokens(llm, [PROMPTS[0]], seeded)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True), SamplingParams(temperature=0, max_tokens=5)]
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], seeded, others[1]], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_different_seeds_give_different_tokens(llm):
    a = tokens(llm, PROMPTS[:1], SamplingParams(temperature=1.0, seed=1, max_tokens=20, ignore_eos=True))
    b = tokens(llm, PROMPTS[:1], SamplingParams(temperature=1.0, seed=2, max_tokens=20, ignore_eos=True))
    assert a != b


def test_top_k_one_equals_greedy(llm):
    greedy = tokens(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    top1 = tokens(llm, PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True))
    assert top1 == greedy


def test_text_is_the_decoded_tokens(llm):
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for o in out:
        assert o.outputs[0].text == llm.get_tokenizer().decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_stop_string_ends_text_before_it(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0]
    stop = full.text[10:13]
    assert stop.strip(), "the tiny model's text should have a usable middle"
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[: full.text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert len(out.token_ids) < len(full.token_ids)


def test_include_stop_str_in_output_keeps_it(llm):
    full = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = full.text[10:13]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_id_ends_generation_and_is_reported(llm):
    full = tokens(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_id = full[4]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full[: full.index(stop_id) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_min_tokens_holds_off_a_stop_token(llm):
    full = tokens(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_id = full[0]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, min_tokens=6, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 6
    assert stop_id not in out.token_ids[:5]


def test_max_tokens_ends_with_length(llm):
    out = llm.generate(PROMPTS, SamplingParams(temperature=0.7, max_tokens=9, ignore_eos=True), use_tqdm=False)
    for o in out:
        assert len(o.outputs[0].token_ids) == 9
        assert o.outputs[0].finish_reason == "length"


def test_n_samples_are_indexed_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=15, ignore_eos=True)
    first = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    second = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) == 3


def test_logprobs_hold_the_sampled_token_and_top_k(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=3, max_tokens=8, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 8
    for token_id, step in zip(out.token_ids, out.logprobs):
        assert token_id in step and step[token_id].rank >= 1
        top = sorted((lp for lp in step.values() if lp.rank <= 3), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3]
        assert top[0].logprob >= top[1].logprob >= top[2].logprob
        assert all(lp.logprob <= 0 for lp in step.values())
    assert math.isclose(out.cumulative_logprob, sum(step[t].logprob for t, step in zip(out.token_ids, out.logprobs)),
                        rel_tol=1e-5)


def test_request_ids_reused_with_other_parameters_get_their_own_sampling(llm):
    """The runner reuses a batch's sampling metadata while the same requests sample; ids that come
    back (a caller's own ids) with other parameters must not inherit the old ones."""
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = tokens(llm, PROMPTS[:2], greedy)

    def run(params):
        for i, prompt in enumerate(PROMPTS[:2]):
            engine.add_request(f"r{i}", prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        return [done["r0"], done["r1"]]

    run(SamplingParams(temperature=5.0, max_tokens=8, ignore_eos=True))
    assert run(greedy) == expected


def _step_all(engine, final_only: bool, prompts, params) -> dict[str, list]:
    """Every output the engine hands back, per request, until all finish."""
    seen: dict[str, list] = {}
    for i, prompt in enumerate(prompts):
        prompt_ids, max_tokens = engine.check(prompt, params)
        engine.enqueue(f"{final_only}-{i}", prompt, prompt_ids, max_tokens, params, final_only=final_only)
    while engine.has_unfinished_requests():
        for out in engine.step():
            samples = [(list(o.token_ids), o.text, o.finish_reason) for o in out.outputs]
            seen.setdefault(out.request_id.split("-", 1)[1], []).append((out.finished, samples))
    return seen


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=12),
                                    SamplingParams(temperature=0.8, seed=5, max_tokens=12, n=2)],
                         ids=["greedy", "seeded-n2"])
def test_final_only_requests_report_once_with_the_tokens_and_text_of_streaming(llm, params):
    prompts = ["The quick brown fox", "Hello there, how are", random_prompts(1, seed=4)[0]]
    streamed = _step_all(llm.engine, False, prompts, params)
    final = _step_all(llm.engine, True, prompts, params)
    assert all(len(updates) > 1 for updates in streamed.values())
    assert final.keys() == streamed.keys()
    for request, updates in final.items():
        assert len(updates) <= params.n  # once per sample, as each finishes
        assert updates[-1] == streamed[request][-1] and updates[-1][0]
