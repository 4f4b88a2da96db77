"""Triton paged-attention kernels on the GPU at real model shapes, against the torch reference.

bf16 (and fp16) kernels are compared with a float32 reference computed from the same low-precision
inputs; float32 kernels, which use IEEE dots, with a tight tolerance. Outputs start poisoned with
NaN: every row a sequence owns must be overwritten, every other row left alone.
"""

from __future__ import annotations

import pytest
import torch

from albireo.kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Import triton only where it will compile: on a CPU machine the interpreter tests in this session
# need triton's first import to happen with TRITON_INTERPRET=1 (see tests/test_triton_attention.py).
if torch.cuda.is_available():
    pytest.importorskip("triton")
    from albireo.kernels import triton_attention as ta

DEVICE = "cuda"
# (num_q_heads, num_kv_heads, head_dim)
MODELS = {
    "llama-8b": (32, 8, 128),
    "llama-1b": (32, 8, 64),
    "qwen-0.5b": (14, 2, 64),
}
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}


# ---------------------------------------------------------------------------------------------
# Helpers


class Batch:
    """Random paged caches and queries for sequences given as (seq_len, query_len).

    Each sequence gets distinct cache blocks in shuffled order; block-table columns past a
    sequence's last block hold other valid block ids (as stale rows do in the runner), so a kernel
    that reads past seq_len gets wrong numbers instead of faulting. extra_rows appends query rows
    owned by no sequence (CUDA-graph padding).
    """

    def __init__(self, seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page, dtype,
                 *, extra_rows=0, width=None, seed=0, device=DEVICE, cache_dtype=None):  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(seed)
        needed = [-(-s // page) for s in seq_lens]
        self.width = width if width is not None else max(needed + [1]) + 1
        num_blocks = max(sum(needed), 1) + 8
        perm = torch.randperm(num_blocks, device=device, generator=gen)
        tables = torch.randint(0, num_blocks, (len(seq_lens), self.width), device=device, generator=gen)
        used = 0
        for i, n in enumerate(needed):
            tables[i, :n] = perm[used : used + n]
            used += n
        self.block_tables = tables.to(torch.int32)
        shape = (num_blocks, page, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, device=device, generator=gen).to(cache_dtype or dtype)
        self.v_cache = torch.randn(shape, device=device, generator=gen).to(cache_dtype or dtype)
        self.qsl = [0]
        for n in query_lens:
            self.qsl.append(self.qsl[-1] + n)
        self.seq_lens = list(seq_lens)
        self.q = torch.randn(self.qsl[-1] + extra_rows, num_q_heads, head_dim, device=device, generator=gen).to(dtype)
        self.scale = head_dim**-0.5
        self.max_query_len = max(list(query_lens) + [1])

    def tensors(self):
        device = self.q.device
        return (
            torch.tensor(self.qsl, dtype=torch.int32, device=device),
            torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
        )

    def expected(self) -> torch.Tensor:
        """float32 attention over the same (low-precision) inputs, for the owned rows."""
        owned = self.qsl[-1]
        q = self.q[:owned].float()
        return reference.paged_attention(q, self.k_cache, self.v_cache, self.block_tables, self.qsl, self.seq_lens, self.scale)

    def run(self, num_splits=None, out=None) -> torch.Tensor:
        qsl, seq_lens = self.tensors()
        if out is None:
            out = torch.full_like(self.q, float("nan"))
        ta.paged_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, qsl, seq_lens, self.scale, self.max_query_len,
            out=out, num_splits=num_splits,
        )  # fmt: skip
        return out

    def check(self, out: torch.Tensor) -> None:
        owned = self.qsl[-1]
        tol = TOL[self.q.dtype]
        assert out.dtype == self.q.dtype
        assert torch.isfinite(out[:owned]).all(), "a query row was not written"
        torch.testing.assert_close(out[:owned].float(), self.expected(), atol=tol, rtol=tol)
        assert torch.isnan(out[owned:]).all(), "rows owned by no sequence must be left alone"


def random_lengths(count, low, high, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=gen).tolist()


# ---------------------------------------------------------------------------------------------
# Decode (split-K path)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
@pytest.mark.parametrize("page", [16, 32])
def test_decode(model, batch, page):
    hq, hk, d = MODELS[model]
    # Edge lengths around block and KV-tile boundaries, then random contexts up to 2048.
    seq_lens = ([1, 16, 17, 63, 64, 65, 2048] + random_lengths(batch, 1, 2048, seed=batch))[:batch]
    b = Batch(seq_lens, [1] * batch, hq, hk, d, page, torch.bfloat16, extra_rows=3, seed=batch + page)
    b.check(b.run())


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8, 16])
def test_decode_num_splits(num_splits):
    hq, hk, d = MODELS["llama-8b"]
    seq_lens = [1, 5, 64, 100, 700, 1500, 3000, 4096]  # short ones leave splits empty
    b = Batch(seq_lens, [1] * len(seq_lens), hq, hk, d, 16, torch.bfloat16, seed=num_splits)
    b.check(b.run(num_splits=num_splits))


def test_decode_with_padding_sequences():
    # Runner padding: sequences with seq_len 0 and no query, rows past query_start_loc[B].
    hq, hk, d = MODELS["qwen-0.5b"]
    seq_lens, query_lens = [300, 0, 1, 0, 0], [1, 0, 1, 0, 0]
    b = Batch(seq_lens, query_lens, hq, hk, d, 16, torch.bfloat16, extra_rows=4)
    for splits in (None, 1, 4):
        b.check(b.run(num_splits=splits))


def test_decode_split_counts_agree():
    hq, hk, d = MODELS["llama-1b"]
    b = Batch(random_lengths(16, 1, 3000, seed=3), [1] * 16, hq, hk, d, 16, torch.bfloat16)
    one = b.run(num_splits=1)
    for splits in (4, 16):
        torch.testing.assert_close(b.run(num_splits=splits), one, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Prefill, chunked prefill and mixed batches


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("page", [16, 32])
def test_prefill_and_chunked_prefill(model, page):
    hq, hk, d = MODELS[model]
    # (prefix, new tokens): full prefills, chunks over 512-token prefixes, a short one.
    seqs = [(0, 1024), (512, 1024), (512, 300), (0, 77), (512, 1)]
    seq_lens = [p + n for p, n in seqs]
    b = Batch(seq_lens, [n for _, n in seqs], hq, hk, d, page, torch.bfloat16, seed=page)
    b.check(b.run())


@pytest.mark.parametrize("model", list(MODELS))
def test_mixed_batch(model):
    hq, hk, d = MODELS[model]
    decodes = random_lengths(64, 1, 2048, seed=7)
    seq_lens = decodes[:30] + [1024, 0] + decodes[30:] + [512 + 256, 33, 0]
    query_lens = [1] * 30 + [1024, 0] + [1] * 34 + [256, 33, 0]
    b = Batch(seq_lens, query_lens, hq, hk, d, 16, torch.bfloat16, extra_rows=5, seed=11)
    b.check(b.run())


def test_small_query_counts():
    # Speculative-decode-like batches: 2..5 queries each, on a long prefix (small BLOCK_Q tiles).
    hq, hk, d = MODELS["llama-8b"]
    query_lens = [2, 3, 4, 5, 2, 1]
    seq_lens = [1000 + n for n in query_lens]
    b = Batch(seq_lens, query_lens, hq, hk, d, 16, torch.bfloat16)
    b.check(b.run())


FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("cache_dtype", FLOAT8)
@pytest.mark.parametrize("batch", [7, 256])
def test_decode_over_a_float8_cache(cache_dtype, batch):
    """kv_cache_dtype fp8: the kernels read float8 keys and values (exact in bf16) for bf16 queries;
    the reference attends over the same float8 values in float32."""
    hq, hk, d = MODELS["llama-8b"]
    seq_lens = ([1, 16, 17, 2048] + random_lengths(batch, 1, 2048, seed=batch))[:batch]
    b = Batch(seq_lens, [1] * batch, hq, hk, d, 16, torch.bfloat16, extra_rows=3, seed=batch, cache_dtype=cache_dtype)
    b.check(b.run())


@pytest.mark.parametrize("cache_dtype", FLOAT8)
def test_mixed_batch_over_a_float8_cache(cache_dtype):
    hq, hk, d = MODELS["llama-1b"]
    decodes = random_lengths(40, 1, 2048, seed=9)
    seq_lens = decodes[:20] + [1024, 512 + 300] + decodes[20:]
    query_lens = [1] * 20 + [1024, 300] + [1] * 20
    b = Batch(seq_lens, query_lens, hq, hk, d, 16, torch.bfloat16, extra_rows=2, seed=13, cache_dtype=cache_dtype)
    b.check(b.run())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    hq, hk, d = MODELS["qwen-0.5b"]
    seq_lens, query_lens = [600, 40, 1, 1], [100, 40, 1, 1]
    b = Batch(seq_lens, query_lens, hq, hk, d, 16, dtype)
    b.check(b.run())
    decode = Batch([600, 5, 1], [1, 1, 1], hq, hk, d, 16, dtype)
    decode.check(decode.run(num_splits=4))


def test_strided_query_and_flat_output():
    hq, hk, d = MODELS["llama-8b"]
    b = Batch([700, 1, 64], [200, 1, 64], hq, hk, d, 16, torch.bfloat16)
    qkv = torch.randn(b.q.shape[0], (hq + 2 * hk) * d, device=DEVICE, dtype=torch.bfloat16)
    qkv[:, : hq * d] = b.q.flatten(1)
    q_view = qkv[:, : hq * d].view(-1, hq, d)
    out = torch.full((b.q.shape[0], hq * d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    qsl, seq_lens = b.tensors()
    ta.paged_attention(q_view, b.k_cache, b.v_cache, b.block_tables, qsl, seq_lens, b.scale, 200, out=out)
    b.check(out.view_as(b.q))


# ---------------------------------------------------------------------------------------------
# write_kv


@pytest.mark.parametrize("model,cache_dtype", [(m, torch.bfloat16) for m in MODELS]
                         + [("llama-8b", dtype) for dtype in FLOAT8])
def test_write_kv(model, cache_dtype):
    """Into a float8 cache too: the kernel rounds each value to it as torch does."""
    _, hk, d = MODELS[model]
    num_blocks, page, tokens = 64, 16, 300
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(tokens, 3 * hk * d, device=DEVICE, generator=gen).to(torch.bfloat16)
    k = qkv[:, hk * d : 2 * hk * d].view(tokens, hk, d)  # strided, as split from a fused projection
    v = qkv[:, 2 * hk * d :].view(tokens, hk, d)
    slots = torch.randperm(num_blocks * page, device=DEVICE, generator=gen)[:tokens]
    slots[::7] = -1
    k_cache = torch.randn(num_blocks, page, hk, d, device=DEVICE, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, page, hk, d, device=DEVICE, generator=gen).to(cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    reference.write_kv(k[keep], v[keep], k_ref, v_ref, slots[keep])
    ta.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# CUDA graphs


@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_cuda_graph_decode_replays_with_new_lengths(num_splits):
    """Capture one decode step (write_kv + paged_attention) for a fixed batch, replay it with
    other lengths, block tables, queries and cache contents: the fixed launch must cover them."""
    hq, hk, d = MODELS["llama-8b"]
    page, real, padded, width = 16, 24, 32, 128  # contexts up to width * page = 2048
    scale = d**-0.5
    num_blocks = real * width + 8

    k_cache = torch.zeros(num_blocks, page, hk, d, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    q = torch.zeros(padded, hq, d, device=DEVICE, dtype=torch.bfloat16)
    k_new = torch.zeros(padded, hk, d, device=DEVICE, dtype=torch.bfloat16)
    v_new = torch.zeros_like(k_new)
    slots = torch.full((padded,), -1, device=DEVICE, dtype=torch.int64)
    block_tables = torch.zeros(padded, width, device=DEVICE, dtype=torch.int32)
    seq_lens = torch.zeros(padded, device=DEVICE, dtype=torch.int32)
    qsl = torch.zeros(padded + 1, device=DEVICE, dtype=torch.int32)
    out = torch.empty(padded, hq, d, device=DEVICE, dtype=torch.bfloat16)

    def step():
        ta.write_kv(k_new, v_new, k_cache, v_cache, slots)
        ta.paged_attention(q, k_cache, v_cache, block_tables, qsl, seq_lens, scale, 1, out=out, num_splits=num_splits)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for trial, (low, high) in enumerate([(1, 40), (500, 2048), (1, 2048)]):
        gen = torch.Generator(device=DEVICE).manual_seed(100 + trial)
        lengths = random_lengths(real, low, high, seed=trial)
        tables = torch.randperm(num_blocks, device=DEVICE, generator=gen)[: real * width].view(real, width)
        k_cache.copy_(torch.randn(k_cache.shape, device=DEVICE, generator=gen))
        v_cache.copy_(torch.randn(v_cache.shape, device=DEVICE, generator=gen))
        q.copy_(torch.randn(q.shape, device=DEVICE, generator=gen))
        k_new.copy_(torch.randn(k_new.shape, device=DEVICE, generator=gen))
        v_new.copy_(torch.randn(v_new.shape, device=DEVICE, generator=gen))
        block_tables.zero_()
        block_tables[:real] = tables.to(torch.int32)
        seq_lens.zero_()
        seq_lens[:real] = torch.tensor(lengths, dtype=torch.int32)
        qsl.copy_(torch.tensor(list(range(real + 1)) + [real] * (padded - real), dtype=torch.int32))
        new_slots = [int(tables[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(lengths)]
        slots.copy_(torch.tensor(new_slots + [-1] * (padded - real)))
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        reference.write_kv(k_new[:real], v_new[:real], k_ref, v_ref, slots[:real])
        out.fill_(float("nan"))

        graph.replay()
        torch.cuda.synchronize()

        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        expected = reference.paged_attention(
            q[:real].float(), k_ref, v_ref, block_tables[:real], list(range(real + 1)), lengths, scale
        )
        torch.testing.assert_close(out[:real].float(), expected, atol=2e-2, rtol=2e-2)
        assert torch.isnan(out[real:]).all()
