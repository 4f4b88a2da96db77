"""Sampling in one pass over the logits: argmax(logits / T + Gumbel noise), Philox noise per row.

Drawing with the Gumbel-max trick gives exactly softmax(logits / T) without computing the softmax,
normalizing or writing intermediate [B, V] tensors: the torch pipeline makes five or six passes
over a [B, V] float32 tensor (temperature, softmax, noise, division, argmax), which at a batch of
a thousand rows and a 128k vocabulary costs milliseconds per step. Each row draws its noise from
Philox with its own seed, so a seeded row's token depends on nothing else in the batch. A row with
temperature 0 takes the plain argmax (first index among ties, like torch.argmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Programs wanted in flight at once: a batch too small to fill the GPU with one program per row
# splits each row's vocabulary into chunks (a single program walking 128k logits of a batch-1
# decode step took tens of microseconds, most of a step's sampling time).
_TARGET_PROGRAMS = 512
_BLOCK = 1024


# The chunking follows the batch size: one compiled variant for every batch (see triton_attention).
# A chunk is a count of blocks, so its start stays a multiple of BLOCK (aligned loads) unspecialized.
@triton.jit(do_not_specialize=["CHUNK_BLOCKS", "NUM_CHUNKS"])
def _gumbel_argmax_kernel(
    logits_ptr, stride, temperature_ptr, seed_ptr, best_score_ptr, best_idx_ptr, V, CHUNK_BLOCKS, NUM_CHUNKS,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    greedy = t == 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / t)
    noise_scale = tl.where(greedy, 0.0, 1.0)
    # The block is viewed as [4, BLOCK // 4] (four contiguous quarters): one Philox call draws a
    # column of each quarter (tl.rand4x), a quarter of the rounds of one call per logit.
    lane = tl.arange(0, 4)[:, None]
    quad = tl.arange(0, BLOCK // 4)[None, :]
    best = tl.full([4, BLOCK // 4], float("-inf"), tl.float32)
    lo = chunk * CHUNK_BLOCKS * BLOCK
    # A chunk of -inf logits alone names its first column, so an all -inf row gives 0 as argmax does.
    best_idx = tl.full([4, BLOCK // 4], 0, tl.int32) + lo
    for start in range(lo, tl.minimum(lo + CHUNK_BLOCKS * BLOCK, V), BLOCK):
        cols = start + lane * (BLOCK // 4) + quad
        mask = cols < V
        logit = tl.load(logits_ptr + row * stride + cols, mask=mask, other=float("-inf")).to(tl.float32)
        # The noise depends on (seed, column) alone (blocks start at multiples of BLOCK), so how the
        # vocabulary is split into chunks never changes the draw. u in (0, 1) keeps both logarithms
        # finite.
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + quad)
        u = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
        u = tl.minimum(tl.maximum(u, 1e-10), 0.99999988)
        score = logit * inv_t - noise_scale * tl.log(-tl.log(u))
        score = tl.where(mask, score, float("-inf"))
        better = score > best  # strict: each lane keeps its first maximum
        best = tl.where(better, score, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(tl.max(best, 1), 0)
    winner = tl.min(tl.min(tl.where(best == top, best_idx, V), 1), 0)
    tl.store(best_score_ptr + row * NUM_CHUNKS + chunk, top)
    tl.store(best_idx_ptr + row * NUM_CHUNKS + chunk, winner)


@triton.jit(do_not_specialize=["NUM_CHUNKS"])
def _chunk_argmax_kernel(best_score_ptr, best_idx_ptr, out_ptr, NUM_CHUNKS, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < NUM_CHUNKS
    score = tl.load(best_score_ptr + row * NUM_CHUNKS + offs, mask=mask, other=float("-inf"))
    idx = tl.load(best_idx_ptr + row * NUM_CHUNKS + offs, mask=mask, other=2147483647)
    top = tl.max(score, 0)
    # Chunks are in column order, so the smallest index among the tied maxima is the first one.
    tl.store(out_ptr + row, tl.min(tl.where(score == top, idx, 2147483647), 0).to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [B, V]: temperature [B] float32 (0 = greedy), seeds [B] int64."""
    assert logits.stride(1) == 1, "the vocabulary dimension must be contiguous"
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if not batch:
        return out
    blocks = triton.cdiv(vocab, _BLOCK)
    num_chunks = max(1, min(blocks, _TARGET_PROGRAMS // batch))
    chunk_blocks = triton.cdiv(blocks, num_chunks)
    num_chunks = triton.cdiv(blocks, chunk_blocks)
    scores = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(batch, num_chunks, dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(batch, num_chunks)](
        logits, logits.stride(0), temperature, seeds, scores, indices, vocab, chunk_blocks, num_chunks,
        BLOCK=_BLOCK, num_warps=4,
    )
    _chunk_argmax_kernel[(batch,)](
        scores, indices, out, num_chunks, BLOCK=triton.next_power_of_2(num_chunks), num_warps=1,
    )
    return out
