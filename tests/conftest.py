"""Tiny random models of every supported architecture, saved as HF directories, with a tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching lets new requests join while others decode.",
    "héllo wörld, naïve café, 日本語のテキスト, emoji 😀🚀 and more.",
    "Numbers 0123456789 and punctuation !?;:,.()[]{}<>+-*/=_",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VOCAB_SIZE = 512

# Architecture name -> (transformers config class name, config overrides).
TINY_MODELS = {
    "llama": ("LlamaConfig", {}),
    "llama-mha-tied-rope-scaling": (
        "LlamaConfig",
        {
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "num_key_value_heads": 1}),
    # Eight query heads, so that TP=8 can split them (each KV head is replicated on four ranks).
    "llama-8-heads": ("LlamaConfig", {"num_attention_heads": 8}),
}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_hf_config(name: str):
    import transformers

    cls_name, overrides = TINY_MODELS[name]
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


@functools.cache
def _saved_model(name: str, root: str) -> str:
    from transformers import AutoModelForCausalLM

    path = Path(root) / name
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(build_hf_config(name), dtype=torch.float32)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_model(models_root):
    """tiny_model(name) -> path of an HF directory with random weights and a tokenizer."""
    return lambda name="llama": _saved_model(name, models_root)


@functools.cache
def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = load_hf(path)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt_ids):].tolist()


def hf_next_token_logprobs(path: str, prompt_ids: list[int]) -> torch.Tensor:
    model = load_hf(path)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def random_prompts(n: int, seed: int = 0, min_len: int = 3, max_len: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB_SIZE, (n_,), generator=g).tolist() for n_ in lengths]
