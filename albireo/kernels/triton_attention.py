"""Triton kernels for the paged KV cache: write_kv and paged_attention.

Same contract as albireo.kernels.reference, which is their oracle.

paged_attention has two paths, both with a grid that depends only on shapes and host ints, so one
launch stays valid for any seq_lens (the decode path is replayed from CUDA graphs):

* Mixed batches (max_query_len > 1): prefill, chunked prefill over a cached prefix and decode rows
  together, one launch. A program owns one KV head and a tile of BLOCK_Q consecutive query tokens of
  one sequence, with all GROUP query heads of that KV head stacked as rows, so every K/V tile it
  loads serves the whole group. The grid is flat over the query tiles of all sequences (T // BLOCK_Q
  + B bounds their count); each program finds its sequence by binary search over query_start_loc.
  A batch of one long prefill and many decodes so launches at most B idle programs, not
  B * cdiv(max_query_len, BLOCK_Q). max_query_len only sizes the tiles.
* Decode-only batches (max_query_len == 1): flash-decoding. Grid (B, Hk, num_splits); each split
  attends to a contiguous, tile-aligned share of the context and writes a normalized partial output
  and its log-sum-exp to scratch, and a second kernel merges the splits. With one split the first
  kernel writes the output directly.

K and V are gathered through the block table position by position, so the KV tile (BLOCK_N) need
not equal the cache block size. Softmax runs online in fp32 in base 2 (scores are pre-multiplied by
scale * log2(e)); the scratch log-sum-exps are base 2 as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from albireo.kernels import pdl, sm_count

# Tunables (H100 defaults; the lead engineer benchmarks these).
# Keys per inner-loop iteration. Any size is correct (K/V are gathered per position); a multiple or
# a divisor of the cache block size keeps each page's rows in one tile.
KV_TILE = 64
MIN_DOT_ROWS = 16  # tl.dot needs M >= 16; decode pads its group rows up to this
MAX_SPLITS = 16
WAVES = 2  # decode: aim for at least this many programs per SM before splitting stops helping


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shape of the decode kernel (bench/attention_tiles.py sweeps it)."""

    kv_tile: int = KV_TILE
    warps: int = 4
    stages: int = 2


# By head dim, from bench/attention_tiles.py (benchmarks/results/decode-attention-*): at 128, tiles
# of 32 keys over two warps read W2's decode KV 5-9% faster on an H200 at TP=2 (four KV heads) and
# 0.3-2.6% at TP=1, and within 0.5% of the default on an H100; at 64 the default stayed best.
DECODE_TILES = {128: DecodeTiles(kv_tile=32, warps=2)}


def decode_tiles(head_dim: int) -> DecodeTiles:
    return DECODE_TILES.get(head_dim, DecodeTiles())

# A batch too small to fill the GPU splits each context; there, shorter tiles gave more splits work:
# a batch-1 decode over 256 keys took 5.5 us against 6.8 (8B, H100, bench/attention_tiles.py).
SPLIT_DECODE_TILES = DecodeTiles(kv_tile=32)


@dataclass(frozen=True)
class PrefillTiles:
    """Launch shape of the mixed path (bench/attention_tiles.py sweeps it)."""

    rows: int = 64  # target rows (query tokens x group heads) per program
    kv_tile: int = KV_TILE
    warps: int | None = None  # None: 4, or 8 for tiles of >= 128 x 128 (rows x head_dim) to avoid spills
    stages: int = 2


# By head dim, from bench/attention_tiles.py on an H100 (benchmarks/results/prefill-attention-*):
# at 128, tiles of 32 keys ran W2's prefill 8% faster than 64; at 64 the default was best.
PREFILL_TILES = {128: PrefillTiles(kv_tile=32)}


def prefill_tiles(head_dim: int) -> PrefillTiles:
    return PREFILL_TILES.get(head_dim, PrefillTiles())

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# write_kv


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    # A negative slot is a padding row (CUDA-graph batches are padded): mask everything out rather
    # than branch, so the padding rows cost nothing but never touch the cache.
    mask = (heads < num_kv_heads) & (dims < HEAD_DIM) & (slot >= 0)
    page = slot // PAGE
    offset = slot % PAGE

    k = tl.load(k_ptr + token.to(tl.int64) * stride_kt + heads * stride_kh + dims * stride_kd, mask=mask)
    v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + heads * stride_vh + dims * stride_vd, mask=mask)
    k_dst = k_cache_ptr + page * stride_kcb + offset * stride_kcs + heads * stride_kch + dims * stride_kcd
    v_dst = v_cache_ptr + page * stride_vcb + offset * stride_vcs + heads * stride_vch + dims * stride_vcd
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [T, Hk, D] at the flat cache slots [T] of caches [blocks, block_size, Hk, D].

    slot = block * block_size + offset; tokens with a negative slot are skipped.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
    if num_tokens == 0:
        return
    heads_pad, dim_pad = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        num_kv_heads,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        PAGE=k_cache.shape[1], HEAD_DIM=head_dim,
        HEADS_PAD=heads_pad, DIM_PAD=dim_pad,
        num_warps=max(1, min(4, heads_pad * dim_pad // 256)),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Shared inner loop


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, qpos,
    k_head_ptr, v_head_ptr, block_table_ptr,
    stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
    lo, hi, scale_log2,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold keys [lo, hi) into the running (acc, m_i, l_i) of the rows of q.

    MASKED=False is for ranges every row sees entirely (no bounds or causal checks per element);
    MASKED=True applies key <= qpos per row and keeps loads below hi.
    """
    dims = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        if MASKED:
            in_range = keys < hi
            page = tl.load(block_table_ptr + keys // PAGE, mask=in_range, other=0).to(tl.int64)
        else:
            page = tl.load(block_table_ptr + keys // PAGE).to(tl.int64)
        offset = keys % PAGE
        # K is gathered already transposed ([D, N]) so the dot needs no layout shuffle in source.
        k_ptrs = k_head_ptr + page[None, :] * stride_kb + offset[None, :] * stride_ks + dims[:, None] * stride_kd
        v_ptrs = v_head_ptr + page[:, None] * stride_vb + offset[:, None] * stride_vs + dims[None, :] * stride_vd
        if MASKED:
            k_t = tl.load(k_ptrs, mask=in_range[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        # The cache may be stored in another dtype than q; the dot wants matching operands.
        k_t = k_t.to(q.dtype)
        v = v.to(q.dtype)

        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            s = tl.where(keys[None, :] <= qpos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet keeps m = -inf; shifting by 0 instead keeps
        # exp2(-inf - -inf) from turning into NaN (alpha and p both come out 0 for it).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _in_dot_dtype(q, cache_ptr):
    """q in the dtype the dots run in: its own, or float16 over a float8 cache (kv_cache_dtype fp8).
    The GPU widens float8 to float16 in one instruction and to bfloat16 in several: W2's decode step
    read its float8 cache at 2.3 TB/s this way against 2.1 through bfloat16 (an H100). float16 holds
    every float8 value, and q's to more bits than bfloat16, but not past 65504."""
    if cache_ptr.dtype.element_ty.is_fp8():
        q = q.to(tl.float16)
    return q


# ---------------------------------------------------------------------------------------------
# Mixed prefill / chunked prefill / decode


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence owning flat query tile `tile`.

    Sequence i's tiles start at query_start_loc[i] // BLOCK_Q + i: the `+ i` leaves room for each
    sequence's partial last tile, so starts strictly increase and the owner is the last sequence
    whose start is <= tile.
    """
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        below = mid_start <= tile
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    return lo


# num_seqs changes every step: one compiled variant for all of them, not one per divisibility class
# (a fresh variant compiles in the middle of a run).
@triton.jit(do_not_specialize=["num_seqs"])
def _mixed_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    scale_log2, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_queries = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    # The grid is an upper bound on tiles; surplus programs and padding sequences stop here.
    if q_tile * BLOCK_Q >= num_queries:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # Row r is query token r // GROUP_PAD of the tile, query head r % GROUP_PAD of the group.
    rows = tl.arange(0, BLOCK_M)
    tok_in_tile = rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    tok = q_tile * BLOCK_Q + tok_in_tile
    row_valid = (tok_in_tile < BLOCK_Q) & (tok < num_queries) & (head_in_group < GROUP)
    q_head = kv_head * GROUP + head_in_group
    dims = tl.arange(0, HEAD_DIM)

    token_row = (q_start + tok).to(tl.int64)
    q_ptrs = q_ptr + token_row[:, None] * stride_qt + q_head[:, None] * stride_qh + dims[None, :] * stride_qd
    q = _in_dot_dtype(tl.load(q_ptrs, mask=row_valid[:, None], other=0.0), k_cache_ptr)

    # Queries are the sequence's last tokens: token j sits at position context + j and sees keys
    # 0..context + j. Rows past the sequence end get positions >= seq_len, which only reach keys
    # the masked loads zero out; their results are never stored.
    context = seq_len - num_queries
    qpos = context + tok
    first_pos = context + q_tile * BLOCK_Q
    last_pos = context + tl.minimum((q_tile + 1) * BLOCK_Q, num_queries) - 1
    # Keys below the first query's position (rounded down to a tile) are visible to every row, so
    # those tiles skip masking; only the diagonal band pays for it. Clamps keep a malformed row
    # (seq_len < its query count) from indexing the block table below 0.
    unmasked_end = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, 0)
    kv_end = tl.maximum(last_pos + 1, 0)

    k_head_ptr = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_cache_ptr + kv_head.to(tl.int64) * stride_vh
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, qpos, k_head_ptr, v_head_ptr, block_table_ptr,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        0, unmasked_end, scale_log2,
        PAGE, BLOCK_N, HEAD_DIM, False, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, qpos, k_head_ptr, v_head_ptr, block_table_ptr,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        unmasked_end, kv_end, scale_log2,
        PAGE, BLOCK_N, HEAD_DIM, True, DOT_PRECISION,
    )  # fmt: skip

    # A row with no visible key (only possible for malformed input) writes zeros, not NaN.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    o_ptrs = out_ptr + token_row[:, None] * stride_ot + q_head[:, None] * stride_oh + dims[None, :] * stride_od
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


# ---------------------------------------------------------------------------------------------
# Decode-only: split-K


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    scale_log2, num_q_heads,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl.wait_for_previous(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    # Padding sequences have no query row; the merge kernel skips them too.
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # Rows are the group's query heads (padded to the tl.dot minimum) of the sequence's one token.
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP
    q_head = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    token_row = q_start.to(tl.int64)
    q_ptrs = q_ptr + token_row * stride_qt + q_head[:, None] * stride_qh + dims[None, :] * stride_qd
    q = _in_dot_dtype(tl.load(q_ptrs, mask=row_valid[:, None], other=0.0), k_cache_ptr)

    # Splits are whole KV tiles, sized from this sequence's length so the grid stays fixed; late
    # splits of a short sequence get an empty range and report lse = -inf.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.maximum(tl.minimum(lo + tiles_per_split * BLOCK_N, seq_len), lo)
    full_end = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    # The decode query sees every key below seq_len; the masked pass only trims the ragged tail.
    qpos = tl.full([BLOCK_M], 0, dtype=tl.int32) + (hi - 1)

    k_head_ptr = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_cache_ptr + kv_head.to(tl.int64) * stride_vh
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, qpos, k_head_ptr, v_head_ptr, block_table_ptr,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        lo, full_end, scale_log2,
        PAGE, BLOCK_N, HEAD_DIM, False, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, qpos, k_head_ptr, v_head_ptr, block_table_ptr,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        full_end, hi, scale_log2,
        PAGE, BLOCK_N, HEAD_DIM, True, DOT_PRECISION,
    )  # fmt: skip

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + token_row * stride_ot + q_head[:, None] * stride_oh + dims[None, :] * stride_od
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        # Scratch is [B, Hq, NUM_SPLITS, (D)], contiguous fp32.
        part = (seq * num_q_heads + q_head).to(tl.int64) * NUM_SPLITS + split
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], o, mask=row_valid[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_valid)


@triton.jit
def _decode_merge_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, query_start_loc_ptr,
    num_q_heads,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl.launch_next_now(PDL)  # o_proj's GEMV follows
    pdl.wait_for_previous(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return

    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * num_q_heads + head).to(tl.int64) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=splits < NUM_SPLITS, other=float("-inf"))
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=(splits < NUM_SPLITS)[:, None])
    # Each split's output is already normalized by its own sum, so it is weighted by its share
    # exp2(lse_s) of the total. Empty splits weigh exp2(-inf) = 0; if all are empty (seq_len 0)
    # the output is zeros.
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)
    total = tl.sum(weight, axis=0)
    o = tl.sum(parts * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    o_ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + dims * stride_od
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Host side

# One growing fp32 scratch buffer per device for the split-K partials. Reusing it gives a CUDA
# graph the same pointer on every replay. A buffer that gets outgrown is kept alive, not freed: a
# graph captured earlier may still point at it. All users run on one stream, in order, so layers
# can share it.
_scratch: dict[torch.device, torch.Tensor] = {}
_retired_scratch: list[torch.Tensor] = []


def _scratch_buffer(device: torch.device, numel: int) -> torch.Tensor:
    buf = _scratch.get(device)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _retired_scratch.append(buf)
        buf = torch.empty(numel, dtype=torch.float32, device=device)
        _scratch[device] = buf
    return buf[:numel]


def default_num_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    """Splits per (sequence, KV head) for decode: enough programs for WAVES per SM, at most
    MAX_SPLITS, and no more than the KV tiles the block table can hold."""
    programs = max(num_seqs * num_kv_heads, 1)
    splits = triton.cdiv(WAVES * sm_count(device), programs)
    return max(1, min(splits, MAX_SPLITS, triton.cdiv(max_kv_len, SPLIT_DECODE_TILES.kv_tile)))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    tiles: PrefillTiles | DecodeTiles | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's last queries over its first seq_lens[i] cached tokens.
    `tiles` overrides the launch shape of the path taken (benchmarks sweep it).

    q [T, Hq, D]; caches [blocks, block_size, Hk, D]; block_tables [B, W] int32; query_start_loc
    [B + 1] int32; seq_lens [B] int32 (new tokens included). max_query_len must bound every
    sequence's query count; 1 selects the split-K decode path (num_splits None picks a default).
    Returns [T, Hq, D] in q's dtype, written into `out` ([T, Hq, D] or [T, Hq * D]) when given.
    Rows owned by no sequence are left untouched. Never syncs with the device.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert v_cache.shape == k_cache.shape and k_cache.shape[3] == head_dim
    assert num_q_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert block_tables.shape[0] == num_seqs and query_start_loc.shape[0] == num_seqs + 1
    assert max_query_len >= 1

    if out is None:
        out = torch.empty_like(q)
    else:
        assert out.dtype == q.dtype and out.numel() == q.numel()
        out = out.view(num_tokens, num_q_heads, head_dim)
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    scale_log2 = scale * _LOG2E
    # fp32 inputs (the interpreter tests, or a debug run) should not silently drop to tf32.
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    common_strides = (*q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0))

    if max_query_len == 1:
        if num_splits is None:
            num_splits = default_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * page, q.device)
        assert 1 <= num_splits
        decode = tiles or (SPLIT_DECODE_TILES if num_splits > 1 else decode_tiles(head_dim))
        if num_splits > 1:
            part_lse_numel = num_seqs * num_q_heads * num_splits
            buf = _scratch_buffer(q.device, part_lse_numel * (head_dim + 1))
            part_out, part_lse = buf[: part_lse_numel * head_dim], buf[part_lse_numel * head_dim :]
        else:
            part_out = part_lse = out  # unused: one split writes the output itself
        on = pdl.enabled(q)
        _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
            q, k_cache, v_cache, out, part_out, part_lse,
            block_tables, query_start_loc, seq_lens,
            scale_log2, num_q_heads,
            *common_strides,
            GROUP=group, BLOCK_M=max(MIN_DOT_ROWS, group_pad), BLOCK_N=decode.kv_tile, PAGE=page,
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, DOT_PRECISION=dot_precision, PDL=on,
            num_warps=decode.warps, num_stages=decode.stages, launch_pdl=on,
        )  # fmt: skip
        if num_splits > 1:
            _decode_merge_kernel[(num_seqs, num_q_heads)](
                out, part_out, part_lse, query_start_loc,
                num_q_heads,
                *out.stride(),
                HEAD_DIM=head_dim, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), PDL=on,
                num_warps=4 if head_dim >= 128 else 2, launch_pdl=on,
            )  # fmt: skip
        return out

    # Mixed path: BLOCK_Q tokens x group_pad heads per program, ~tiles.rows rows.
    tiles = tiles or prefill_tiles(head_dim)
    block_q = min(triton.next_power_of_2(max_query_len), max(1, tiles.rows // group_pad))
    block_m = max(MIN_DOT_ROWS, block_q * group_pad)
    # Sequence i's tiles start at query_start_loc[i] // block_q + i, so this bounds them all.
    num_tiles = num_tokens // block_q + num_seqs
    _mixed_attention_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, out,
        block_tables, query_start_loc, seq_lens,
        scale_log2, num_seqs,
        *common_strides,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_N=tiles.kv_tile, PAGE=page, HEAD_DIM=head_dim, DOT_PRECISION=dot_precision,
        num_warps=tiles.warps or (8 if block_m * head_dim >= 128 * 128 else 4), num_stages=tiles.stages,
    )  # fmt: skip
    return out


__all__ = ["DecodeTiles", "PrefillTiles", "decode_tiles", "default_num_splits", "paged_attention", "write_kv"]
