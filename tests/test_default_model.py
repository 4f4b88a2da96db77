"""The embedded SmolLM2-135M-Instruct answers like transformers does on the same GGUF weights."""

from pathlib import Path

import pytest
import torch

from albireo import LLM, SamplingParams
from albireo.config import default_model_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    return LLM()


def test_default_model_answers_paris(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_default_model_greedy_equals_transformers(llm):
    from transformers import AutoModelForCausalLM

    path = Path(default_model_path())
    prompt = llm.apply_chat_template(QUESTION)
    prompt_ids = llm.get_tokenizer().encode(prompt, add_special_tokens=False)
    ours = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert ours.outputs[0].token_ids == ref[0, len(prompt_ids):].tolist()
