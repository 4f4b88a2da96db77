"""Triton paged-attention kernels vs the torch reference, on CPU through the Triton interpreter
(tests/interpreter.py says when it runs in this process and when in a child process).

Shapes stay small: the interpreter runs every program of the grid in Python.
"""

from __future__ import annotations

import pytest
import torch

import interpreter

IN_PROCESS, interpreted, test_in_interpreter_subprocess = interpreter.kernel_test_module(__file__)

from albireo.kernels import reference  # noqa: E402

if IN_PROCESS:
    from albireo.kernels import triton_attention as ta


# ---------------------------------------------------------------------------------------------
# Helpers


def make_batch(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page, *, extra_rows=0, seed=0):
    """Random caches, shuffled block tables and queries for sequences (seq_len, query_len).

    Block tables are one width for all rows, wider than needed, and every sequence gets distinct
    blocks drawn from a random permutation (non-contiguous, out of order). extra_rows appends
    query rows owned by no sequence, as CUDA-graph padding does.
    """
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-s // page) for s in seq_lens) + 2 if seq_lens else 1
    num_blocks = width * len(seq_lens) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = perm[: width * len(seq_lens)].view(len(seq_lens), width).to(torch.int32)
    k_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=gen)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1] + extra_rows, num_q_heads, head_dim, generator=gen)
    return q, k_cache, v_cache, block_tables, qsl


def run_and_check(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page, *, max_query_len=None,
                  num_splits=None, extra_rows=0, seed=0):  # fmt: skip
    q, k_cache, v_cache, block_tables, qsl = make_batch(
        seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page, extra_rows=extra_rows, seed=seed
    )
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: every owned row must be overwritten
    result = ta.paged_attention(
        q, k_cache, v_cache, block_tables,
        torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), scale,
        max_query_len if max_query_len is not None else max(*query_lens, 1),
        out=out, num_splits=num_splits,
    )  # fmt: skip
    assert result.data_ptr() == out.data_ptr()
    owned = qsl[-1]
    expected = reference.paged_attention(q[:owned], k_cache, v_cache, block_tables, qsl, seq_lens, scale)
    assert torch.isfinite(out[:owned]).all(), "a query row was not written"
    torch.testing.assert_close(out[:owned], expected, atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[owned:]).all(), "rows owned by no sequence must be left alone"


# ---------------------------------------------------------------------------------------------
# paged_attention


@interpreted
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim, page",
    [(2, 2, 64, 16), (4, 2, 128, 32), (4, 1, 64, 32), (8, 2, 64, 16), (8, 1, 128, 16)],
)
def test_prefill_only(num_q_heads, num_kv_heads, head_dim, page):
    # Lengths straddle KV tiles (64) and query tiles; one sequence spans several of each.
    seq_lens = [37, 1, 90]
    run_and_check(seq_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, page)


@interpreted
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
def test_decode_splits(num_splits):
    # 150 keys = 3 tiles: 3 and 8 splits leave some splits empty for the short sequences.
    seq_lens = [150, 1, 64, 65, 7]
    run_and_check(seq_lens, [1] * len(seq_lens), 8, 2, 64, 16, num_splits=num_splits)


@interpreted
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim, page, num_splits",
    [(4, 4, 128, 32, 4), (8, 1, 64, 32, 2), (7, 1, 64, 16, 3), (16, 2, 64, 16, 1)],
)
def test_decode_group_shapes(num_q_heads, num_kv_heads, head_dim, page, num_splits):
    # Group 1, 8, 7 (not a power of two: padded rows) and 8 with two KV heads.
    seq_lens = [70, 3, 129]
    run_and_check(seq_lens, [1] * len(seq_lens), num_q_heads, num_kv_heads, head_dim, page, num_splits=num_splits)


@interpreted
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim, page",
    [(2, 2, 64, 32), (4, 2, 64, 16), (8, 2, 128, 16), (8, 1, 64, 32)],
)
def test_mixed_batch_with_cached_prefixes(num_q_heads, num_kv_heads, head_dim, page):
    # Chunked prefill over prefixes (some past a full KV tile, so the unmasked pass runs), a full
    # prefill, decodes, a padding sequence in the middle and one at the end.
    seq_lens = [100, 5, 0, 20, 131, 1, 0]
    query_lens = [30, 1, 0, 20, 3, 1, 0]
    run_and_check(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page)


@interpreted
def test_mixed_with_loose_max_query_len_and_padding_rows():
    # max_query_len only has to bound the query counts; trailing rows belong to no sequence.
    seq_lens = [40, 9, 17]
    query_lens = [4, 1, 17]
    run_and_check(seq_lens, query_lens, 4, 2, 64, 16, max_query_len=32, extra_rows=5)


@interpreted
def test_mixed_step_padded_as_its_cuda_graph():
    # A mixed graph of 32 token rows and 8 request slots replaying a 22-token step of three
    # requests: max_query_len is the graph's row count, the last five requests and ten rows are padding.
    seq_lens = [40, 9, 12, 0, 0, 0, 0, 0]
    query_lens = [8, 1, 12, 0, 0, 0, 0, 0]
    run_and_check(seq_lens, query_lens, 4, 2, 64, 16, max_query_len=32, extra_rows=10)


@interpreted
def test_decode_padding_rows_and_sequences():
    # CUDA-graph style: padding sequences (seq_len 0, no query) and rows past query_start_loc[B].
    seq_lens = [33, 0, 80, 0]
    run_and_check(seq_lens, [1, 0, 1, 0], 4, 1, 64, 16, num_splits=4, extra_rows=3)


@interpreted
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_query_without_keys_gives_zeros(num_splits):
    # A query row whose sequence has no keys (a graph padding slot filled with seq_len 0) must
    # not produce NaN: it comes out as zeros.
    q, k_cache, v_cache, block_tables, qsl = make_batch([12, 0], [1, 1], 4, 2, 64, 16)
    out = torch.full_like(q, float("nan"))
    ta.paged_attention(
        q, k_cache, v_cache, block_tables, torch.tensor(qsl, dtype=torch.int32), torch.tensor([12, 0], dtype=torch.int32),
        0.125, 1, out=out, num_splits=num_splits,
    )  # fmt: skip
    expected = reference.paged_attention(q[:1], k_cache, v_cache, block_tables, qsl[:2], [12], 0.125)
    torch.testing.assert_close(out[:1], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@interpreted
def test_strided_query_and_flat_output():
    # q as a view into a fused qkv projection, out given as [T, Hq * D] like the layer's output.
    num_q_heads, num_kv_heads, head_dim, page = 4, 2, 64, 16
    seq_lens, query_lens = [50, 6], [10, 1]
    q, k_cache, v_cache, block_tables, qsl = make_batch(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page)
    qkv = torch.randn(q.shape[0], (num_q_heads + 2 * num_kv_heads) * head_dim)
    qkv[:, : num_q_heads * head_dim] = q.flatten(1)
    q_view = qkv[:, : num_q_heads * head_dim].view(-1, num_q_heads, head_dim)
    assert not q_view.is_contiguous()
    out = torch.full((q.shape[0], num_q_heads * head_dim), float("nan"))
    result = ta.paged_attention(
        q_view, k_cache, v_cache, block_tables,
        torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), 0.125, 10, out=out,
    )  # fmt: skip
    expected = reference.paged_attention(q, k_cache, v_cache, block_tables, qsl, seq_lens, 0.125)
    assert result.shape == q.shape and result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.view_as(q), expected, atol=1e-5, rtol=1e-5)


@interpreted
def test_allocates_output_when_none_given():
    q, k_cache, v_cache, block_tables, qsl = make_batch([20], [20], 2, 1, 64, 16)
    result = ta.paged_attention(
        q, k_cache, v_cache, block_tables, torch.tensor(qsl, dtype=torch.int32), torch.tensor([20], dtype=torch.int32),
        0.125, 20,
    )  # fmt: skip
    expected = reference.paged_attention(q, k_cache, v_cache, block_tables, qsl, [20], 0.125)
    assert result.dtype == q.dtype and result.shape == q.shape
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("max_query_len, num_splits", [(6, None), (1, 3)])
def test_half_precision_inputs(max_query_len, num_splits):
    # The low-precision casts (p to V's dtype, cache to q's dtype, output to q's dtype). fp16 only:
    # the interpreter's tl.dot mishandles bf16 operands, so bf16 is covered by the GPU tests.
    seq_lens = [70, 9, 1]
    query_lens = [6, 1, 1] if max_query_len > 1 else [1, 1, 1]
    q, k_cache, v_cache, block_tables, qsl = make_batch(seq_lens, query_lens, 4, 2, 64, 16)
    q, k_cache, v_cache = q.half(), k_cache.half(), v_cache.half()
    out = torch.full_like(q, float("nan"))
    ta.paged_attention(
        q, k_cache, v_cache, block_tables, torch.tensor(qsl, dtype=torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32), 0.125, max_query_len, out=out, num_splits=num_splits,
    )  # fmt: skip
    expected = reference.paged_attention(q.float(), k_cache, v_cache, block_tables, qsl, seq_lens, 0.125)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


@interpreted
def test_default_num_splits():
    cpu = torch.device("cpu")  # counts as 132 SMs
    assert ta.default_num_splits(256, 8, 4096, cpu) == 1  # 2048 programs: plenty of waves
    assert ta.default_num_splits(1, 8, 4096, cpu) == 16  # capped at MAX_SPLITS
    assert ta.default_num_splits(4, 8, 4096, cpu) == 9  # ceil(264 / 32)
    assert ta.default_num_splits(1, 1, 32, cpu) == 1  # one split tile (32 keys) in the whole table
    assert ta.default_num_splits(1, 8, 200, cpu) == 7  # ceil(200 / 32) tiles


# ---------------------------------------------------------------------------------------------
# write_kv


@interpreted
@pytest.mark.parametrize("num_kv_heads, head_dim, page", [(2, 64, 16), (1, 128, 32), (3, 16, 16)])
def test_write_kv_skips_negative_slots(num_kv_heads, head_dim, page):
    gen = torch.Generator().manual_seed(1)
    num_blocks, tokens = 5, 9
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[[2, 7]] = -1  # padding rows
    k_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=gen)
    _assert_write_kv_stores_what_the_reference_does(k, v, k_cache, v_cache, slots)


def _assert_write_kv_stores_what_the_reference_does(k, v, k_cache, v_cache, slots):
    """write_kv into the caches equals the reference writing the rows with a slot (>= 0)."""
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    reference.write_kv(k[keep], v[keep], k_expected, v_expected, slots[keep])
    ta.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)


@interpreted
def test_write_kv_strided_input_and_dtype_conversion():
    # k, v as views of a fused qkv row, fp16 into an fp32 cache.
    gen = torch.Generator().manual_seed(2)
    num_kv_heads, head_dim, page, tokens = 2, 32, 16, 6
    qkv = torch.randn(tokens, 8 * head_dim, generator=gen).half()
    k = qkv[:, 4 * head_dim : 6 * head_dim].view(tokens, num_kv_heads, head_dim)
    v = qkv[:, 6 * head_dim :].view(tokens, num_kv_heads, head_dim)
    slots = torch.tensor([3, 17, 18, 40, -5, 0], dtype=torch.int64)
    k_cache = torch.zeros(3, page, num_kv_heads, head_dim)
    v_cache = torch.zeros(3, page, num_kv_heads, head_dim)
    _assert_write_kv_stores_what_the_reference_does(k, v, k_cache, v_cache, slots)


@interpreted
def test_write_then_attend_matches_reference_step():
    # One engine step: this step's K/V go in through write_kv, then attention reads them back.
    num_q_heads, num_kv_heads, head_dim, page = 4, 2, 64, 16
    seq_lens, query_lens = [45, 1, 12], [15, 1, 12]
    q, k_cache, v_cache, block_tables, qsl = make_batch(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page)
    gen = torch.Generator().manual_seed(3)
    k_new = torch.randn(q.shape[0], num_kv_heads, head_dim, generator=gen)
    v_new = torch.randn(q.shape[0], num_kv_heads, head_dim, generator=gen)
    slots = []
    for i, (s, n) in enumerate(zip(seq_lens, query_lens)):
        for pos in range(s - n, s):
            slots.append(int(block_tables[i, pos // page]) * page + pos % page)
    slots = torch.tensor(slots, dtype=torch.int64)

    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv(k_new, v_new, k_ref, v_ref, slots)
    expected = reference.paged_attention(q, k_ref, v_ref, block_tables, qsl, seq_lens, 0.125)

    ta.write_kv(k_new, v_new, k_cache, v_cache, slots)
    out = ta.paged_attention(
        q, k_cache, v_cache, block_tables,
        torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), 0.125, max(query_lens),
    )  # fmt: skip
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
