"""Bad input fails early with ValueError or FileNotFoundError naming the field or file and the limit.

Nothing here may surface as a raw error from deep inside torch, safetensors or gguf, and a
rejected request must leave the engine serving everything else.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from albireo.config import ArchConfig, default_model_path
from albireo.entrypoints.llm import LLM
from albireo.model.loader import iter_gguf
from albireo.sampling_params import SamplingParams

from conftest import VOCAB_SIZE, random_prompts

MAX_LEN = 64


@pytest.fixture(scope="module")
def llama_path(tiny_model) -> str:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(llama_path) -> LLM:
    return LLM(llama_path, max_model_len=MAX_LEN, num_kv_blocks=64)


def ids(n: int, seed: int = 0) -> list[int]:
    return random_prompts(1, seed=seed, min_len=n, max_len=n)[0]


def copy_model(src: str, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _dir, names: [n for n in names if n.endswith(skip)] if skip else [])
    return dst


# --- prompts against the context and the vocabulary ---------------------------------------------


@pytest.mark.parametrize("n", [MAX_LEN, 100])
def test_prompt_longer_than_context(llm, n):
    with pytest.raises(ValueError) as e:
        llm.engine.add_request("too-long", ids(n), SamplingParams(max_tokens=1))
    assert "max_model_len" in str(e.value) and str(MAX_LEN) in str(e.value) and str(n) in str(e.value)
    assert "too-long" not in llm.engine.requests


def test_generate_names_the_bad_prompt(llm):
    with pytest.raises(ValueError, match=r"prompts\[1\].*100 tokens.*max_model_len is 64"):
        llm.generate([ids(5), ids(100), ids(6)], SamplingParams(max_tokens=2), use_tqdm=False)
    # A text prompt over the limit is caught the same way, after tokenization.
    with pytest.raises(ValueError, match=r"prompts\[0\].*max_model_len is 64"):
        llm.generate("The quick brown fox jumps over the lazy dog. " * 20, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_a_bad_prompt_after_the_first_steps_began_leaves_nothing_running(llama_path):
    # Prompts are queued two steps' worth (here 2 x 16 tokens) before each step, so the bad prompt
    # is checked after two steps were launched; it must still name itself and take the rest down.
    llm = LLM(llama_path, max_model_len=MAX_LEN, num_kv_blocks=64, max_num_batched_tokens=16)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match=r"prompts\[8\].*100 tokens"):
        llm.generate([ids(10, seed=s) for s in range(8)] + [ids(100)], greedy, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.core.scheduler.has_unfinished_requests()
    # The engine still serves, with the tokens a fresh engine gives.
    again = llm.generate([ids(10, seed=1)], greedy, use_tqdm=False)[0].outputs[0].token_ids
    fresh = LLM(llama_path, max_model_len=MAX_LEN, num_kv_blocks=64).generate([ids(10, seed=1)], greedy, use_tqdm=False)
    assert again == fresh[0].outputs[0].token_ids


def test_max_tokens_that_cannot_fit(llm):
    with pytest.raises(ValueError) as e:
        llm.generate(ids(50), SamplingParams(max_tokens=20), use_tqdm=False)
    msg = str(e.value)
    assert "prompts[0]" in msg and "max_tokens=20" in msg and "50 tokens" in msg
    assert "max_model_len is 64" in msg and "at most 14" in msg
    # Exactly filling the context is allowed.
    [out] = llm.generate(ids(50), SamplingParams(max_tokens=14, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 14 and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("prompt", [[5, VOCAB_SIZE], [-1, 5], [5, 3.0], [5, "7"], [[5, 6], [7, 8]], [5, [6]]],
                         ids=["too-large", "negative", "float", "text", "nested", "ragged"])
def test_prompt_ids_outside_vocabulary(llm, prompt):
    with pytest.raises(ValueError, match=rf"prompts\[0\].*token ids.*\[0, {VOCAB_SIZE}\)"):
        llm.generate([prompt], use_tqdm=False)


@pytest.mark.parametrize("prompt", [[[]], ""], ids=["no-ids", "no-text"])
def test_empty_prompt(llm, prompt):
    with pytest.raises(ValueError, match=r"prompts\[0\]: prompt is empty"):
        llm.generate(prompt, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.engine.add_request("empty", prompt[0] if isinstance(prompt, list) else prompt, SamplingParams())


def test_mismatched_params_list(llm):
    with pytest.raises(ValueError, match="2 prompts but 3 sampling_params"):
        llm.generate([ids(3), ids(4)], [SamplingParams()] * 3, use_tqdm=False)


# --- SamplingParams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert msg.startswith((field + " ", field + "=")), msg
    value = kwargs[field]
    if field == "min_tokens":
        assert "max_tokens=5" in msg and "min_tokens=10" in msg
    else:
        assert repr(value) in msg, msg


@pytest.mark.parametrize(
    "kwargs, field",
    [({"tensor_parallel_size": 0}, "tensor_parallel_size"), ({"sampling": "vote"}, "sampling"),
     ({"all_reduce": "mpi"}, "all_reduce")],
)
def test_parallel_config_names_the_field(kwargs, field):
    from albireo.config import ParallelConfig

    with pytest.raises(ValueError, match=f"^{field} must be .*{kwargs[field]!r}"):
        ParallelConfig(**kwargs)


def test_cache_config_names_an_unknown_kv_cache_dtype():
    from albireo.config import CacheConfig

    with pytest.raises(ValueError, match=r"^kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2; got 'int4'$"):
        CacheConfig(kv_cache_dtype="int4")


# --- model directories -------------------------------------------------------------------------


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2})
    )
    with pytest.raises(ValueError) as e:
        LLM(str(tmp_path))
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in msg


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LLM(str(missing))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json"))):
        LLM(str(tmp_path))


def test_missing_tokenizer_path_fails_fast(llama_path):
    # A path that does not exist must not be taken for a hub id (no network: minutes of retries).
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="tokenizer path no-such-tokenizer does not exist"):
        LLM(llama_path, tokenizer="no-such-tokenizer")
    assert time.monotonic() - start < 5


def test_directory_without_tokenizer(llama_path, tmp_path):
    model = copy_model(llama_path, tmp_path / "m", skip=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(ValueError, match=rf"cannot load a tokenizer from {re.escape(str(model))}"):
        LLM(str(model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(llama_path):
    with pytest.raises(ValueError, match="device is cuda, but CUDA is not available"):
        LLM(llama_path, device="cuda")


def test_unreadable_config(llama_path, tmp_path):
    model = copy_model(llama_path, tmp_path / "m")
    (model / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"cannot read the model config of {re.escape(str(model))}"):
        LLM(str(model))


def test_missing_weight_file(llama_path, tmp_path):
    model = copy_model(llama_path, tmp_path / "m", skip=(".safetensors",))
    with pytest.raises(FileNotFoundError, match=rf"no \*\.safetensors weights in {re.escape(str(model))}"):
        LLM(str(model))


def test_truncated_safetensors(llama_path, tmp_path):
    model = copy_model(llama_path, tmp_path / "m")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*(truncated|corrupt)"):
        LLM(str(model))


def test_safetensors_missing_a_tensor(llama_path, tmp_path):
    model = copy_model(llama_path, tmp_path / "m")
    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = "model.layers.1.self_attn.k_proj.weight"
    del tensors[dropped]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing weights: {dropped}"):
        LLM(str(model))


def test_safetensors_extra_tensor(llama_path, tmp_path):
    model = copy_model(llama_path, tmp_path / "m")
    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected weight 'model.layers.0.mlp.extra_proj.weight'"):
        LLM(str(model))


def test_weight_with_wrong_shape(llama_path, tmp_path):
    model = copy_model(llama_path, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 32  # head_dim becomes 8; every stored matrix is now the wrong shape
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        LLM(str(model))
    msg = str(e.value)
    assert str(model) in msg and "does not fit the model config" in msg
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not iterable)
    named = [name for name in shapes if f"weight {name!r} of shape {shapes[name]}" in msg]
    assert named, msg


# --- GGUF --------------------------------------------------------------------------------------


def test_truncated_gguf(tmp_path):
    src = Path(default_model_path())
    truncated = tmp_path / src.name
    with src.open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match=rf"{re.escape(str(truncated))}.*(truncated|corrupt)"):
        LLM(str(truncated))


def _tiny_arch() -> ArchConfig:
    return ArchConfig(
        architecture="LlamaForCausalLM",
        vocab_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        qkv_bias=False,
        qk_norm=False,
        sliding_window=None,
        eos_token_ids=[2],
        bos_token_id=1,
    )


def _undequantizable_type() -> GGMLQuantizationType:
    """A quant type that gguf stores but cannot dequantize (found by trying, as gguf evolves)."""
    for qtype in (GGMLQuantizationType.Q8_1, GGMLQuantizationType.Q8_K, *GGMLQuantizationType):
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if block_size == 1:
            continue
        try:
            dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            return qtype
    pytest.skip("this gguf version dequantizes every quant type")


def test_gguf_tensor_type_that_cannot_be_dequantized(tmp_path):
    qtype = _undequantizable_type()
    arch = _tiny_arch()
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    path = tmp_path / "bad-quant.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(arch.num_layers)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_head_count(arch.num_heads)
    writer.add_context_length(arch.max_position_embeddings)
    # A normal tensor first, so the bad one is found in the middle of the file, not at its start.
    writer.add_tensor("output_norm.weight", np.ones(arch.hidden_size, dtype=np.float32))
    raw = np.zeros((arch.vocab_size, arch.hidden_size // block_size * type_size), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    weights = iter_gguf(str(path), arch)
    name, tensor = next(weights)
    assert name == "model.norm.weight" and tensor.shape == (arch.hidden_size,)
    with pytest.raises(ValueError) as e:
        next(weights)
    msg = str(e.value)
    assert str(path) in msg and "token_embd.weight" in msg and qtype.name in msg and "dequantized" in msg


# --- a rejected request loses nothing ----------------------------------------------------------


def test_rejected_request_leaves_the_batch_running(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    engine.add_request("good-0", ids(10, seed=1), params)
    sampled = SamplingParams(max_tokens=4, temperature=0.8, seed=3, ignore_eos=True)
    engine.add_request("good-1", ids(20, seed=2), sampled)
    # Too long, no room for max_tokens, outside the vocabulary, empty.
    for bad_prompt in [ids(70), ids(60), [VOCAB_SIZE + 7], []]:
        with pytest.raises(ValueError):
            engine.add_request("bad", bad_prompt, params)
        assert "bad" not in engine.requests
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good-0", ids(3), params)

    finished = {}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"good-0", "good-1"}
    assert len(finished["good-0"].outputs[0].token_ids) == 7
    assert len(finished["good-1"].outputs[0].token_ids) == 4
    assert all(out.outputs[0].finish_reason == "length" for out in finished.values())

    # The same greedy prompt run alone gives the same tokens: the rejections disturbed nothing.
    [alone] = llm.generate(ids(10, seed=1), params, use_tqdm=False)
    assert alone.outputs[0].token_ids == finished["good-0"].outputs[0].token_ids


def test_rejected_batch_runs_nothing(llm):
    good = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    with pytest.raises(ValueError, match=r"prompts\[2\]"):
        llm.generate([ids(5), ids(6), ids(MAX_LEN)], good, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    outs = llm.generate([ids(5), ids(6)], good, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]


def test_a_gguf_file_is_parsed_once_while_unchanged_and_again_once_rewritten(tmp_path):
    from albireo.config import read_gguf

    path = tmp_path / "tiny.gguf"

    def write(hidden: int) -> None:
        writer = GGUFWriter(str(path), "llama")
        writer.add_embedding_length(hidden)
        writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write(32)
    first = read_gguf(str(path))
    assert read_gguf(str(path)) is first  # the shape's read and the weights' share one parse
    write(48)
    assert read_gguf(str(path)).fields["llama.embedding_length"].contents() == 48
