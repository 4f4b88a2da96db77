"""Every architecture, greedy, token for token against HF transformers on tiny random models."""

import pytest
import torch

from albireo import LLM, SamplingParams

from conftest import TINY_MODELS, hf_greedy, hf_next_token_logprobs, random_prompts

MAX_NEW_TOKENS = 16


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_greedy_batch_equals_transformers(tiny_model, name):
    path = tiny_model(name)
    prompts = random_prompts(6, seed=len(name))
    llm = LLM(path, max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, MAX_NEW_TOKENS)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_first_step_logprobs_close_to_transformers(tiny_model, name):
    """Top-20 log-probabilities of the first step agree within rtol 1e-4, atol 1e-4 (float32)."""
    path = tiny_model(name)
    prompt = random_prompts(1, seed=99, min_len=40, max_len=40)[0]
    llm = LLM(path)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)[0]
    ours = out.outputs[0].logprobs[0]
    reference = hf_next_token_logprobs(path, prompt)
    ids = torch.tensor(list(ours))
    got = torch.tensor([lp.logprob for lp in ours.values()])
    torch.testing.assert_close(got, reference[ids], rtol=1e-4, atol=1e-4)
    assert set(ours) >= set(reference.topk(20).indices.tolist())
