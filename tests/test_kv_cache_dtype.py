"""A float8 KV cache (kv_cache_dtype "fp8", "fp8_e4m3" or "fp8_e5m2"): what it stores, what
attention reads from it, and how many blocks it holds."""

import pytest
import torch

from albireo import LLM
from albireo.config import KV_CACHE_DTYPES
from albireo.kernels import reference


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_written_keys_and_values_are_rounded_to_float8_and_attention_reads_them_so(name):
    float8 = KV_CACHE_DTYPES[name]
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 20, 2, 8, generator=gen)
    k_cache, v_cache = (torch.zeros(4, 8, 2, 8, dtype=float8) for _ in range(2))
    slots = torch.randperm(32, generator=gen)[:20]
    reference.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 2, 8)[slots].float(), k.to(float8).float())
    assert torch.equal(v_cache.view(-1, 2, 8)[slots].float(), v.to(float8).float())

    q = torch.randn(5, 4, 8, generator=gen)
    tables = torch.tensor([[2, 0, 3, 1]])
    args = (tables, [0, 5], [29], 8**-0.5)
    # The cache's float8 values, exactly: attention over them is attention over their float32 copies.
    assert torch.equal(reference.paged_attention(q, k_cache, v_cache, *args),
                       reference.paged_attention(q, k_cache.float(), v_cache.float(), *args))


def test_a_float8_cache_holds_four_times_the_blocks_of_a_float32_one_in_the_same_memory(tiny_model):
    path = tiny_model("llama")
    blocks = {}
    for kv_cache_dtype, element_size in (("auto", 4), ("fp8", 1)):
        llm = LLM(path, dtype="float32", cpu_kv_cache_gb=0.01, kv_cache_dtype=kv_cache_dtype)
        blocks[kv_cache_dtype] = llm.engine.core.scheduler.kv.num_blocks
        assert llm.engine.core.executor.worker.runner.kv_cache.element_size() == element_size
        llm.engine.shutdown()
    assert 4 * blocks["auto"] <= blocks["fp8"] < 4 * (blocks["auto"] + 1)  # each the budget // a block's bytes
