"""The runner's pure planning helpers."""

from albireo.runner.model_runner import graph_token_sizes, largest_prefill


def test_largest_prefill_fills_the_token_budget_with_prompts_of_the_context_length():
    assert largest_prefill(16384, 2048, 1024).tolist() == [2048] * 8


def test_largest_prefill_ends_with_a_shorter_prompt_when_the_budget_is_not_a_multiple():
    assert largest_prefill(5000, 2048, 1024).tolist() == [2048, 2048, 904]


def test_largest_prefill_is_one_prompt_when_the_context_exceeds_the_budget():
    assert largest_prefill(512, 2048, 8).tolist() == [512]


def test_largest_prefill_takes_no_more_prompts_than_sequences_allowed():
    assert largest_prefill(16384, 1000, 4).tolist() == [1000] * 4


def test_steps_with_prompt_tokens_get_graphs_up_to_512_tokens():
    assert graph_token_sizes(8192) == [16, 32, 64, 128, 256, 384, 512]


def test_a_token_budget_below_512_is_the_largest_step_graph():
    assert graph_token_sizes(100) == [16, 32, 64, 100]
