import math

import pytest
import torch

from albireo.sampling.sampler import (
    Sampler,
    SamplingMetadata,
    SamplingRow,
    apply_penalties,
    step_seed,
)
from albireo.sampling_params import SamplingParams

CPU = torch.device("cpu")


def row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: list[int] | None = None,
    **params,
) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt or [0]), list(output or []), list(eos or []))


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    metadata = SamplingMetadata.build(rows, logits.shape[1], CPU)
    return Sampler()(logits, metadata)


def repeat(logits_row: list[float], n: int) -> torch.Tensor:
    return torch.tensor(logits_row, dtype=torch.float32).repeat(n, 1)


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


# --- greedy -------------------------------------------------------------------------------------


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    out = sample(logits, [row(temperature=0.0) for _ in range(6)])
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=1))


def test_greedy_rows_unaffected_by_sampled_rows_in_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(8, 40)
    rows = [
        row(temperature=0.0) if i % 2 == 0 else row(temperature=1.5, top_k=5, top_p=0.9, min_p=0.05)
        for i in range(8)
    ]
    out = sample(logits, rows)
    greedy_rows = torch.arange(0, 8, 2)
    assert torch.equal(out.sampled_token_ids[greedy_rows], logits[greedy_rows].argmax(dim=1))


def test_greedy_ignores_top_k_top_p_min_p():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0]])
    out = sample(logits, [row(temperature=0.0, top_k=1, top_p=0.01, min_p=0.99)])
    assert out.sampled_token_ids.tolist() == [1]


# --- top-k / top-p / min-p ----------------------------------------------------------------------


def test_top_k_one_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(64, 100)
    out = sample(logits, [row(temperature=1.0, top_k=1) for _ in range(64)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=1))


def test_top_k_only_yields_tokens_among_k_largest():
    torch.manual_seed(3)
    base = torch.randn(30)
    allowed = set(base.topk(4).indices.tolist())
    out = sample(base.repeat(2000, 1), [row(temperature=2.0, top_k=4) for _ in range(2000)])
    drawn = set(out.sampled_token_ids.tolist())
    assert drawn == allowed  # all four show up in 2000 draws at temperature 2, and nothing else


def test_top_k_rows_with_different_k_in_one_batch():
    torch.manual_seed(4)
    base = torch.randn(30)
    order = base.argsort(descending=True).tolist()
    rows = [row(temperature=5.0, top_k=2) for _ in range(500)] + [row(temperature=5.0) for _ in range(500)]
    out = sample(base.repeat(1000, 1), rows).sampled_token_ids
    assert set(out[:500].tolist()) == set(order[:2])
    assert len(set(out[500:].tolist())) > 10  # top_k off: the flat tail is reachable


def test_top_p_small_keeps_only_top_token():
    torch.manual_seed(5)
    logits = torch.randn(200, 20)
    out = sample(logits, [row(temperature=1.0, top_p=0.01) for _ in range(200)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=1))


def test_top_p_excludes_tail_outside_nucleus():
    # Probabilities 0.5, 0.3, 0.1, 0.05, 0.05: with top_p 0.7 the nucleus is {0, 1}.
    logits = repeat(log_probs([0.5, 0.3, 0.1, 0.05, 0.05]), 2000)
    torch.manual_seed(6)
    out = sample(logits, [row(temperature=1.0, top_p=0.7) for _ in range(2000)])
    counts = torch.bincount(out.sampled_token_ids, minlength=5)
    assert counts[2:].sum() == 0
    # Renormalised nucleus: 0.5/0.8 and 0.3/0.8.
    assert abs(counts[0].item() / 2000 - 0.625) < 0.05


def test_top_p_keeps_token_that_crosses_threshold():
    # 0.5 alone does not reach 0.55, so the nucleus must include token 1 as well.
    logits = repeat(log_probs([0.5, 0.3, 0.2]), 1000)
    torch.manual_seed(7)
    out = sample(logits, [row(temperature=1.0, top_p=0.55) for _ in range(1000)])
    assert set(out.sampled_token_ids.tolist()) == {0, 1}


def test_top_k_and_top_p_combined():
    # top_k 3 leaves 0.5, 0.3, 0.1 (renormalised 0.556, 0.333, 0.111); top_p 0.8 then keeps {0, 1}.
    logits = repeat(log_probs([0.5, 0.3, 0.1, 0.05, 0.05]), 1000)
    torch.manual_seed(8)
    out = sample(logits, [row(temperature=1.0, top_k=3, top_p=0.8) for _ in range(1000)])
    assert set(out.sampled_token_ids.tolist()) == {0, 1}


def test_min_p_excludes_low_probability_tokens():
    # min_p 0.3 of the top probability 0.5 is 0.15: tokens 2..4 are dropped.
    logits = repeat(log_probs([0.5, 0.3, 0.1, 0.05, 0.05]), 2000)
    torch.manual_seed(9)
    out = sample(logits, [row(temperature=1.0, min_p=0.3) for _ in range(2000)])
    assert set(out.sampled_token_ids.tolist()) == {0, 1}


# --- temperature --------------------------------------------------------------------------------


def test_temperature_sampling_matches_softmax_frequencies():
    n = 8000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temperature = 0.7
    torch.manual_seed(10)
    out = sample(base.repeat(n, 1), [row(temperature=temperature) for _ in range(n)])
    observed = torch.bincount(out.sampled_token_ids, minlength=8).double()
    expected = (base.double() / temperature).softmax(0) * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001


def test_high_temperature_flattens_distribution():
    n = 4000
    base = torch.tensor([1.0, 0.0])
    torch.manual_seed(11)
    hot = sample(base.repeat(n, 1), [row(temperature=100.0) for _ in range(n)])
    share_of_top = (hot.sampled_token_ids == 0).double().mean().item()
    assert abs(share_of_top - 0.5) < 0.04


# --- penalties ----------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    # Token 0 in the prompt, token 1 in the output, tokens 2 and 3 unseen, token 4 in both.
    rows = [row(prompt=[0, 4], output=[1, 4], repetition_penalty=2.0)]
    processed = apply_penalties(logits, SamplingMetadata.build(rows, 5, CPU))
    assert processed.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.5]]


def test_frequency_penalty_subtracts_penalty_times_output_count():
    logits = torch.zeros(1, 5)
    # Prompt tokens do not count toward the frequency penalty.
    rows = [row(prompt=[4, 4], output=[1, 2, 2, 2], frequency_penalty=0.5)]
    processed = apply_penalties(logits, SamplingMetadata.build(rows, 5, CPU))
    assert processed.tolist() == [[0.0, -0.5, -1.5, 0.0, 0.0]]


def test_presence_penalty_subtracts_once_per_output_token():
    logits = torch.zeros(1, 5)
    rows = [row(prompt=[4], output=[1, 2, 2, 2], presence_penalty=0.25)]
    processed = apply_penalties(logits, SamplingMetadata.build(rows, 5, CPU))
    assert processed.tolist() == [[0.0, -0.25, -0.25, 0.0, 0.0]]


def test_all_penalties_combine_repetition_first():
    logits = torch.tensor([[3.0, 3.0, 3.0]])
    rows = [
        row(prompt=[0], output=[1, 1], repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25)
    ]
    processed = apply_penalties(logits, SamplingMetadata.build(rows, 3, CPU))
    # token 0: 3 / 1.5; token 1: 3 / 1.5 - 0.5 * 2 - 0.25; token 2 untouched.
    assert torch.allclose(processed, torch.tensor([[2.0, 0.75, 3.0]]))


def test_penalties_pad_rows_of_different_lengths_without_touching_last_token():
    vocab = 6
    logits = torch.full((3, vocab), 1.0)
    rows = [
        row(prompt=[0, 1, 2, 3], output=[], repetition_penalty=2.0),
        row(prompt=[5], output=[4, 4, 4, 4, 4], frequency_penalty=0.1),
        row(prompt=[1], output=[2], presence_penalty=0.5),  # short prompt and output
    ]
    metadata = SamplingMetadata.build(rows, vocab, CPU)
    assert metadata.prompt_token_ids.tolist()[2] == [1, vocab, vocab, vocab]
    assert metadata.output_token_ids.tolist()[0] == [vocab] * 5
    processed = apply_penalties(logits, metadata)
    expected = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5, 1.0, 1.0],
            [1.0, 1.0, 1.0, 1.0, 0.5, 1.0],  # the prompt token 5 takes no frequency penalty
            [1.0, 1.0, 0.5, 1.0, 1.0, 1.0],
        ]
    )
    assert torch.allclose(processed, expected)


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    out = sample(logits, [row(output=[0, 0, 0], temperature=0.0, frequency_penalty=1.0)])
    assert out.sampled_token_ids.tolist() == [1]


def test_no_penalty_rows_skip_id_tensors():
    metadata = SamplingMetadata.build([row(prompt=[1, 2], output=[3])], 10, CPU)
    assert metadata.prompt_token_ids is None and metadata.output_token_ids is None


def test_input_logits_are_not_modified():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    before = logits.clone()
    sample(logits, [row(output=[0], repetition_penalty=2.0, min_tokens=3, eos=[1], top_k=2, logprobs=1)])
    assert torch.equal(logits, before)


# --- min_tokens ---------------------------------------------------------------------------------


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])  # EOS 3 best, stop id 4 next
    params = dict(temperature=0.0, min_tokens=3, stop_token_ids=[4])
    blocked = sample(logits, [row(output=[0, 0], eos=[3], **params)])
    assert blocked.sampled_token_ids.tolist() == [2]
    reached = sample(logits, [row(output=[0, 0, 0], eos=[3], **params)])
    assert reached.sampled_token_ids.tolist() == [3]


def test_min_tokens_leaves_eos_alone_with_ignore_eos():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])
    rows = [row(eos=[3], temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[4])]
    out = sample(logits, rows)
    assert out.sampled_token_ids.tolist() == [3]


def test_min_tokens_blocks_only_its_own_row():
    logits = torch.tensor([[0.0, 5.0, 1.0]]).repeat(2, 1)
    rows = [row(eos=[1], temperature=0.0, min_tokens=1), row(eos=[1], temperature=0.0)]
    assert sample(logits, rows).sampled_token_ids.tolist() == [2, 1]


# --- seeds --------------------------------------------------------------------------------------


def _seeded_token(logits_row: torch.Tensor, seed: int, output_len: int, others: int, position: int) -> int:
    """Sample the seeded row placed at `position` among `others` unseeded rows."""
    rows = [row(temperature=1.0, top_p=0.9) for _ in range(others)]
    rows.insert(position, row(output=[0] * output_len, temperature=1.0, seed=seed))
    logits = torch.randn(others + 1, logits_row.shape[0])
    logits[position] = logits_row
    return sample(logits, rows).sampled_token_ids[position].item()


def test_seeded_row_same_token_regardless_of_batch_and_position():
    torch.manual_seed(12)
    logits_row = torch.randn(500) * 0.1  # nearly flat, so the token depends on the noise
    alone = [_seeded_token(logits_row, seed=1234, output_len=step, others=0, position=0) for step in range(5)]
    for others, position in [(3, 0), (3, 3), (7, 4)]:
        torch.manual_seed(100 + others)  # the default generator state must not matter
        batched = [_seeded_token(logits_row, 1234, step, others, position) for step in range(5)]
        assert batched == alone


def test_different_seeds_draw_different_tokens():
    logits_row = torch.zeros(1000)
    a = [_seeded_token(logits_row, seed=1, output_len=step, others=0, position=0) for step in range(6)]
    b = [_seeded_token(logits_row, seed=2, output_len=step, others=0, position=0) for step in range(6)]
    assert a != b


def test_same_seed_draws_differ_across_output_lengths():
    logits_row = torch.zeros(1000)
    tokens = [_seeded_token(logits_row, seed=7, output_len=step, others=0, position=0) for step in range(8)]
    assert len(set(tokens)) > 4


def test_seeded_rows_use_per_step_generators():
    rows = [row(seed=5, output=[1, 2]), row(), row(seed=5, temperature=0.0)]
    metadata = SamplingMetadata.build(rows, 10, CPU)
    assert list(metadata.generators) == [0]  # greedy seeded rows draw nothing
    assert metadata.generators[0].initial_seed() == step_seed(5, 2)
    assert step_seed(5, 2) != step_seed(5, 3) != step_seed(6, 2)
    assert 0 <= step_seed(-1, 0) < 2**64


# --- logprobs -----------------------------------------------------------------------------------


def test_logprobs_column_zero_is_raw_logprob_of_sampled_token():
    torch.manual_seed(13)
    logits = torch.randn(4, 30)
    # Penalties and temperature must not leak into the returned logprobs.
    rows = [row(output=[1, 2, 3], temperature=0.8, repetition_penalty=1.3, logprobs=2) for _ in range(4)]
    out = sample(logits, rows)
    raw = logits.log_softmax(dim=1)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    assert torch.allclose(out.logprobs[:, 0], raw.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1))
    assert out.logprobs.dtype == torch.float32


def test_logprobs_top_k_sorted_and_correct_with_max_k_columns():
    torch.manual_seed(14)
    logits = torch.randn(3, 30)
    rows = [row(logprobs=2), row(), row(logprobs=4)]
    out = sample(logits, rows)
    assert out.logprob_token_ids.shape == (3, 5) and out.logprobs.shape == (3, 5)
    raw = logits.log_softmax(dim=1)
    expected_values, expected_ids = raw.topk(4, dim=1)
    assert torch.equal(out.logprob_token_ids[:, 1:], expected_ids)
    assert torch.allclose(out.logprobs[:, 1:], expected_values)
    assert (out.logprobs[:, 1:-1] >= out.logprobs[:, 2:]).all()


def test_sampled_rank_counts_tokens_at_least_as_likely():
    torch.manual_seed(15)
    logits = torch.randn(200, 30)
    out = sample(logits, [row(temperature=1.0, logprobs=0) for _ in range(200)])
    sampled_logit = logits.gather(1, out.sampled_token_ids.unsqueeze(1))
    expected = (logits > sampled_logit).sum(dim=1) + 1
    assert torch.equal(out.sampled_ranks, expected)
    assert out.logprob_token_ids.shape == (200, 1)
    assert (out.sampled_ranks > 1).any()  # the check is not vacuous


def test_greedy_sampled_rank_is_one():
    torch.manual_seed(16)
    logits = torch.randn(5, 30)
    out = sample(logits, [row(temperature=0.0, logprobs=1) for _ in range(5)])
    assert out.sampled_ranks.tolist() == [1] * 5


def test_no_logprobs_requested_returns_none():
    out = sample(torch.randn(2, 10), [row(), row(temperature=0.0)])
    assert out.logprob_token_ids is None and out.logprobs is None and out.sampled_ranks is None


@pytest.mark.parametrize("k", [0, 3])
def test_logprob_width_is_max_k_plus_one(k):
    out = sample(torch.randn(2, 10), [row(logprobs=k), row()])
    assert out.logprobs.shape == (2, k + 1)


@pytest.mark.parametrize(
    "params,reusable",
    [
        (dict(temperature=0.8, top_p=0.9, logprobs=2), True),
        (dict(temperature=0), True),
        (dict(temperature=0.8, seed=3), False),  # its noise depends on the step
        (dict(temperature=0, seed=3), True),  # a greedy row never draws
        (dict(temperature=0.8, presence_penalty=0.5), False),  # reads the output so far
        (dict(temperature=0.8, min_tokens=4, stop_token_ids=[7]), False),  # still blocked
    ],
)
def test_metadata_is_reusable_only_when_nothing_in_it_depends_on_the_step(params, reusable):
    metadata = SamplingMetadata.build([row(**params), row(temperature=1.0)], 64, CPU)
    assert metadata.reusable == reusable


def test_min_tokens_once_reached_makes_metadata_reusable():
    rows = [row(output=[1, 2], temperature=0.8, min_tokens=2, stop_token_ids=[7])]
    assert SamplingMetadata.build(rows, 64, CPU).reusable


def test_reused_metadata_samples_like_a_fresh_one():
    rows = [row(temperature=0), row(temperature=1.0, top_k=1)]
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 0.0, 0.0]])
    fresh = Sampler()(logits, SamplingMetadata.build(rows, 4, CPU)).sampled_token_ids
    reused = Sampler()(logits, SamplingMetadata.build(rows, 4, CPU).for_next_step()).sampled_token_ids
    assert reused.tolist() == fresh.tolist() == [1, 0]


def test_logits_in_the_model_dtype_sample_as_their_float32_widening():
    """The model hands over bf16 logits; the sampler widens them itself, exactly."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    rows = [row(temperature=0, logprobs=3), row(temperature=0), row(temperature=0, logprobs=1), row(temperature=0)]
    narrow, wide = sample(logits, rows), sample(logits.float(), rows)
    assert narrow.sampled_token_ids.tolist() == wide.sampled_token_ids.tolist()
    assert torch.equal(narrow.logprobs, wide.logprobs) and narrow.logprobs.dtype == torch.float32
