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

from albireo.kernels.triton_all_reduce import ROUNDS, ExchangeSlots, advance_round

# Programs wanted in flight at once: a batch too small to fill the GPU with one program per row
# splits each row's vocabulary into chunks (a single program walking 128k logits of a batch-1
# decode step took tens of microseconds, most of a step's sampling time).
_TARGET_PROGRAMS = 512
_BLOCK = 1024


# The chunking follows the batch size: one compiled variant for every batch (see triton_attention).
# A chunk is a count of blocks, so its start stays a multiple of BLOCK (aligned loads) unspecialized.
@triton.jit(do_not_specialize=["col_lo", "col_hi", "CHUNK_BLOCKS", "NUM_CHUNKS"])
def _gumbel_argmax_kernel(
    logits_ptr, stride, temperature_ptr, seed_ptr, best_score_ptr, best_idx_ptr, col_lo, col_hi, CHUNK_BLOCKS,
    NUM_CHUNKS, BLOCK: tl.constexpr,
):
    """logits_ptr holds the vocabulary's columns [col_lo, col_hi) (a rank's shard under TP; all of
    them otherwise). Blocks stay aligned to the whole vocabulary's, so every column draws the noise
    it draws in an unsharded call."""
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
    lo = (col_lo // BLOCK + chunk * CHUNK_BLOCKS) * BLOCK
    # A chunk of -inf logits alone names its first column, so an all -inf row gives 0 as argmax does.
    best_idx = tl.full([4, BLOCK // 4], 0, tl.int32) + tl.maximum(lo, col_lo)
    for start in range(lo, tl.minimum(lo + CHUNK_BLOCKS * BLOCK, col_hi), BLOCK):
        cols = start + lane * (BLOCK // 4) + quad
        mask = (cols >= col_lo) & (cols < col_hi)
        logit = tl.load(logits_ptr + row * stride + cols - col_lo, mask=mask, other=float("-inf")).to(tl.float32)
        # The noise depends on (seed, column) alone (blocks start at multiples of BLOCK), so how the
        # vocabulary is split into chunks or shards never changes the draw. u in (0, 1) keeps both
        # logarithms finite.
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + quad)
        u = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
        u = tl.minimum(tl.maximum(u, 1e-10), 0.99999988)
        score = logit * inv_t - noise_scale * tl.log(-tl.log(u))
        score = tl.where(mask, score, float("-inf"))
        better = score > best  # strict: each lane keeps its first maximum
        best = tl.where(better, score, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(tl.max(best, 1), 0)
    winner = tl.min(tl.min(tl.where(best == top, best_idx, 2147483647), 1), 0)
    tl.store(best_score_ptr + row * NUM_CHUNKS + chunk, top)
    tl.store(best_idx_ptr + row * NUM_CHUNKS + chunk, winner)


@triton.jit
def _best_of(score, idx, best, best_idx):
    """(best, best_idx) updated with a tile of candidates that come after it in column order: the
    smallest column among a tile's tied maxima is its first, and a later tile only wins with a
    strictly larger score."""
    top = tl.max(score, 0)
    first = tl.min(tl.where(score == top, idx, 2147483647), 0)
    take = (top > best) | ((top == best) & (first < best_idx))
    return tl.maximum(best, top), tl.where(take, first, best_idx)


# A fixed tile over the chunks, whatever their number: a block size that followed the batch compiled
# a variant per power of two, in the middle of a run (W1's first steps spent 90 and 70 ms on them).
_CHUNK_TILE = 128


@triton.jit(do_not_specialize=["NUM_CHUNKS"])
def _chunk_argmax_kernel(best_score_ptr, best_idx_ptr, out_ptr, NUM_CHUNKS, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    best = float("-inf")
    best_idx = 2147483647
    for start in range(0, NUM_CHUNKS, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < NUM_CHUNKS
        score = tl.load(best_score_ptr + row * NUM_CHUNKS + offs, mask=mask, other=float("-inf"))
        idx = tl.load(best_idx_ptr + row * NUM_CHUNKS + offs, mask=mask, other=2147483647)
        best, best_idx = _best_of(score, idx, best, best_idx)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def chunks_for(batch: int, columns: int) -> int:
    """How many chunks each row's `columns` logits split into: enough programs to fill the GPU."""
    return max(1, min(triton.cdiv(columns, _BLOCK), _TARGET_PROGRAMS // max(batch, 1)))


def gumbel_candidates(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, col_lo: int = 0, col_hi: int | None = None,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best score and column per chunk of the columns [col_lo, col_hi) that logits [B, n]
    hold: float32 and int32 [B, num_chunks]. Ranks holding vocabulary shards pass the same
    num_chunks, so that their candidates line up (`pick_candidates`)."""
    assert logits.stride(1) == 1, "the vocabulary dimension must be contiguous"
    batch = logits.shape[0]
    col_hi = col_lo + logits.shape[1] if col_hi is None else col_hi
    blocks = triton.cdiv(col_hi, _BLOCK) - col_lo // _BLOCK
    if num_chunks is None:
        chunk_blocks = triton.cdiv(blocks, chunks_for(batch, col_hi - col_lo))
        num_chunks = triton.cdiv(blocks, chunk_blocks)  # no chunk left without columns
    else:
        chunk_blocks = max(1, triton.cdiv(blocks, num_chunks))
    scores = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(batch, num_chunks, dtype=torch.int32, device=logits.device)
    if batch:
        _gumbel_argmax_kernel[(batch, num_chunks)](
            logits, logits.stride(0), temperature, seeds, scores, indices, col_lo, col_hi, chunk_blocks, num_chunks,
            BLOCK=_BLOCK, num_warps=4,
        )
    return scores, indices


def pick_candidates(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The token of each row from candidates [B, C] whose chunks are in column order (shards'
    candidates concatenated along C in rank order): the best score, the first column among ties."""
    batch, num_chunks = scores.shape
    out = torch.empty(batch, dtype=torch.int64, device=scores.device)
    if batch:
        _chunk_argmax_kernel[(batch,)](scores.contiguous(), indices.contiguous(), out, num_chunks, BLOCK=_CHUNK_TILE,
                                       num_warps=1)
    return out


# An exchange slot no peer has written this round: a packed candidate never equals it, as its low
# half is a column (>= 0). Buffers hold ROUNDS x world slots of int64s, all of it at first.
EMPTY_CANDIDATE = tl.constexpr(-1)


@triton.jit(do_not_specialize=["rows", "NUM_CHUNKS"])
def _exchange_pick_kernel(
    best_score_ptr, best_idx_ptr, out_ptr, peers_ptr, round_ptr, rows, NUM_CHUNKS, slot_numel,
    RANK: tl.constexpr, WORLD: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Each rank's candidates [rows, NUM_CHUNKS] of its vocabulary shard go, packed as (score bits,
    column) int64s, into every peer's slot of this round; each row's token is then picked from all
    ranks' candidates in rank order, which is column order, as _chunk_argmax_kernel picks."""
    first = tl.program_id(0)
    step = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    turn = tl.load(round_ptr)
    round_base = turn.to(tl.int64) * WORLD * slot_numel
    # Every row this program owns goes out before it waits for any (all programs are resident).
    for row in range(first, rows, step):
        for start in range(0, NUM_CHUNKS, BLOCK):
            c = start + offs
            mask = c < NUM_CHUNKS
            score = tl.load(best_score_ptr + row * NUM_CHUNKS + c, mask=mask)
            idx = tl.load(best_idx_ptr + row * NUM_CHUNKS + c, mask=mask)
            packed = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | idx.to(tl.int64)
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    buffer = tl.load(peers_ptr + peer).to(tl.pointer_type(tl.int64))
                    tl.store(buffer + round_base + RANK * slot_numel + row * NUM_CHUNKS + c, packed, mask=mask)

    own = tl.load(peers_ptr + RANK).to(tl.pointer_type(tl.int64))
    for row in range(first, rows, step):
        best = float("-inf")
        best_idx = 2147483647
        for src in tl.static_range(WORLD):
            for start in range(0, NUM_CHUNKS, BLOCK):
                c = start + offs
                mask = c < NUM_CHUNKS
                if src == RANK:
                    score = tl.load(best_score_ptr + row * NUM_CHUNKS + c, mask=mask, other=float("-inf"))
                    idx = tl.load(best_idx_ptr + row * NUM_CHUNKS + c, mask=mask, other=2147483647)
                else:
                    slot = own + round_base + src * slot_numel + row * NUM_CHUNKS + c
                    v = tl.load(slot, mask=mask, other=0, volatile=True)
                    while tl.max(((v == EMPTY_CANDIDATE) & mask).to(tl.int32), axis=0) > 0:
                        v = tl.load(slot, mask=mask, other=0, volatile=True)
                    tl.store(slot, tl.full([BLOCK], EMPTY_CANDIDATE, tl.int64), mask=mask)
                    score = tl.where(mask, (v >> 32).to(tl.int32).to(tl.float32, bitcast=True), float("-inf"))
                    idx = tl.where(mask, v.to(tl.int32), 2147483647)
                best, best_idx = _best_of(score, idx, best, best_idx)
        tl.store(out_ptr + row, best_idx.to(tl.int64))

    advance_round(round_ptr, turn, step, ROUNDS)


def exchange_pick(scores: torch.Tensor, indices: torch.Tensor, exchange: ExchangeSlots,
                  max_programs: int | None = None) -> torch.Tensor:
    """Every row's token from this rank's candidates [B, C] of its vocabulary shard and the peers'
    (the same C each, shards in rank order), swapped through `exchange`: what pick_candidates gives
    on all ranks' candidates concatenated, in one launch instead of a collective and a pick. Every
    rank must make the same sequence of calls, with B * C <= exchange.slot_numel (int64 slots, all
    EMPTY_CANDIDATE before the first call)."""
    from albireo.kernels import sm_count

    batch, num_chunks = scores.shape
    assert batch * num_chunks <= exchange.slot_numel
    out = torch.empty(batch, dtype=torch.int64, device=scores.device)
    if max_programs is None:
        # Every program must be resident while it waits for its peers' rows: two one-warp programs
        # an SM leave room for whatever else runs (an SM holds 32).
        max_programs = 2 * sm_count(scores.device)
    _exchange_pick_kernel[(max(1, min(batch, max_programs)),)](
        scores.contiguous(), indices.contiguous(), out, exchange.peers, exchange.rounds, batch, num_chunks,
        exchange.slot_numel, RANK=exchange.rank, WORLD=exchange.peers.numel(), ROUNDS=ROUNDS, BLOCK=_CHUNK_TILE, num_warps=1,
    )
    return out


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [B, V]: temperature [B] float32 (0 = greedy), seeds [B] int64."""
    return pick_candidates(*gumbel_candidates(logits, temperature, seeds))
