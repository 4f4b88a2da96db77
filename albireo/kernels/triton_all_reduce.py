"""All-reduce in one kernel, with no barrier: every rank pushes its rows into its peers' buffers and
sums what lands in its own (the Lamport scheme, as TensorRT-LLM's small all-reduce).

Each rank owns an exchange buffer mapped into every peer's address space (torch symmetric memory,
CUDA IPC): ROUNDS rounds x world slots x `slot_numel` elements. Empty elements hold -0.0. One-shot,
rank r writes its partial sums (any -0.0 turned into +0.0, which sums the same) into slot r of the
current round in every peer's buffer, then polls its own buffer's slots of the peers until no
element is -0.0 any more, adds them and its own partial sums (read in place) in rank order and
writes -0.0 back behind it. Since each element is written once per round, "not -0.0" means "this
peer's value arrived": no flags, no barrier, one launch. At batch 1 the row-parallel GEMV writes its
product into the peers' slots itself (`albireo.kernels.triton_gemv.gemv(push=...)`), as its programs
finish, and this kernel is told so (`pushed`): it only waits and sums.

One-shot sends world - 1 copies of the tensor. Past two ranks and a few hundred KiB that is more than
NVLink carries in time, and the same kernel runs two-shot (`two_shot`): each row is summed by one
rank, its owner, which the others send their parts to and which sends the total back, in two halves
of the same slots; a rank sends 2 (world - 1) / world of the tensor, and still no barrier.

The round lives in device memory (a counter the call's last program advances), not in Python, so a
CUDA graph replays the right round whatever number of calls it captured. Reusing a round's buffer
is safe: every call involves every rank (one-shot, each waits for every peer's part; two-shot, row
0's owner waits for every peer's part and every other rank for its total), so a rank that has
finished a call knows that every peer has started it, and so finished the call before. A rank
writes a round's buffers again three calls later, after finishing the two calls in between: every
peer has by then finished the call that last used them, emptying what it read (a pushing GEMV
writes after its PDL wait, so after the all-reduce before it has ended).

With a residual and a norm weight, the sum goes straight on into the residual add and the RMSNorm
that follow a row-parallel layer (as `albireo.kernels.triton_fused.rms_norm`, same roundings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from albireo.kernels import pdl, sm_count
from albireo.kernels.triton_fused import MAX_NORM_BLOCK, norm_num_warps, rms_normalize

ROUNDS = 3


@dataclass(frozen=True)
class ExchangeSlots:
    """A rank's view of exchange buffers in this scheme: every rank's buffer address (int64 [world]),
    this rank's round counter (int32 [2]), a slot's size in elements, and the rank. Where a pushing
    GEMV sends its part of an all-reduce (`triton_gemv.gemv(push=...)`), and through which the
    vocabulary-parallel sampler swaps its candidates (`triton_sampling.exchange_pick`)."""

    peers: torch.Tensor
    rounds: torch.Tensor
    slot_numel: int
    rank: int


@triton.jit
def _empty(v, WIDE: tl.constexpr):
    """Which elements still hold -0.0, the mark of a slot no peer has written this round."""
    if WIDE:
        return v.to(tl.int32, bitcast=True) == -2147483648
    else:
        return v.to(tl.int16, bitcast=True) == -32768


@triton.jit
def as_summand(v, WIDE: tl.constexpr):
    """v as it may go into an exchange slot: any -0.0, which would read as empty, as +0.0 (the
    same summand)."""
    return tl.where(_empty(v, WIDE), 0.0, v).to(v.dtype)


@triton.jit
def advance_round(round_ptr, turn, step, ROUNDS: tl.constexpr):
    """The last of a call's `step` programs to get here moves this rank on to the next round. Every
    program read the round before it arrived here, and the next call starts only after this kernel
    has ended. A lone program (a batch-1 step's) needs no count, and no atomic's round trip."""
    if step == 1:
        tl.store(round_ptr, (turn + 1) % ROUNDS)
    elif tl.atomic_add(round_ptr + 1, 1) == step - 1:
        tl.store(round_ptr + 1, 0)
        tl.store(round_ptr, (turn + 1) % ROUNDS)


@triton.jit
def _buffer(peers_ptr, rank, dtype: tl.constexpr):
    """Rank `rank`'s exchange buffer, from the table of addresses. The alignment hint lets stores to
    a peer go out as 16-byte vectors, not element by element."""
    return tl.multiple_of(tl.load(peers_ptr + rank).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _take(slot, mask, empty, WIDE: tl.constexpr):
    """A peer's row from this rank's own buffer once every element has landed, emptied behind it."""
    v = tl.load(slot, mask=mask, other=0.0, volatile=True)
    while tl.max((_empty(v, WIDE) & mask).to(tl.int32), axis=0) > 0:
        v = tl.load(slot, mask=mask, other=0.0, volatile=True)
    tl.store(slot, empty, mask=mask)
    return v


@triton.jit
def _sum_row(mine, r, slots, slot_numel, mask, empty, RANK: tl.constexpr, WORLD: tl.constexpr,
             WIDE: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK: tl.constexpr):
    """This rank's part of a row and each peer's (taken from its slot; `slots` points at slot 0
    where the row's parts land) summed in rank order in float32, rounded, and under HAS_NORM the
    residual r added."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        if src == RANK:
            v = mine
        else:
            v = _take(slots + src * slot_numel, mask, empty, WIDE)
        total += v.to(tl.float32)
    s = total.to(mine.dtype)
    if HAS_NORM:
        s = (s.to(tl.float32) + r.to(tl.float32)).to(mine.dtype)
    return s


@triton.jit
def _write_row(s, at, cols, mask, out_ptr, res_ptr, w, N, eps, HAS_NORM: tl.constexpr):
    """A summed row (with the residual added, under HAS_NORM) into the residual and the output."""
    if HAS_NORM:
        tl.store(res_ptr + at + cols, s, mask=mask)
        s = rms_normalize(s, w, N, eps)
    tl.store(out_ptr + at + cols, s.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows"])  # one compiled variant for every batch size
def _push_all_reduce_kernel(
    x_ptr,
    out_ptr,
    res_ptr,
    w_ptr,
    peers_ptr,  # int64 [world]: the address of each rank's exchange buffer
    round_ptr,  # int32 [2], this rank's: the current round, and how many programs have finished it
    rows,
    slot_numel,
    N,
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    ROUNDS: tl.constexpr,
    WIDE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
    PUSHED: tl.constexpr,
    TWO_SHOT: tl.constexpr,
):
    first = tl.program_id(0)
    step = tl.num_programs(0)
    pdl.launch_next_now(PDL)  # a projection or a norm follows, reading only weights before its wait
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dtype = x_ptr.dtype.element_ty
    if WIDE:
        empty = tl.full([BLOCK], -2147483648, tl.int32).to(dtype, bitcast=True)
    else:
        empty = tl.full([BLOCK], -32768, tl.int16).to(dtype, bitcast=True)
    w = x_ptr  # no norm: never read
    if HAS_NORM:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # no kernel writes a weight: read before the wait
    if PUSHED:
        # The GEMV before this kernel sent x itself, and wrote neither the round nor the residual:
        # kernels before it did, and they had finished when the GEMV let this kernel launch (it does
        # so only once its own wait has returned, `pdl.wait_for_previous`). So both are read before
        # the wait for the GEMV, off the chain's critical path. A pushed call has one row a program.
        turn = tl.load(round_ptr)
        if HAS_NORM:
            residual_row = tl.load(res_ptr + first * N + cols, mask=mask, other=0.0)
    pdl.wait_for_previous(PDL)
    if not PUSHED:
        turn = tl.load(round_ptr)
    round_base = turn.to(tl.int64) * WORLD * slot_numel + cols
    own = _buffer(peers_ptr, RANK, dtype)

    if TWO_SHOT:
        # Row r belongs to rank r % WORLD, which alone sums it: the others send it their parts
        # (first half of a slot, at the row's place among its owner's rows), and it sends the total
        # back to each of them (second half). Every rank gets the same bits, and each sends
        # 2 (WORLD - 1) / WORLD of x instead of the one-shot's WORLD - 1 copies. A program waits only
        # on the peers' programs of its own index (same grid, same rows; started before any program
        # of a higher index, see below), which send every part before they wait, and every owner
        # sends its totals before it waits for the others'.
        half = slot_numel // 2
        for row in range(first, rows, step):
            owner = row % WORLD
            if owner != RANK:
                x = as_summand(tl.load(x_ptr + row * N + cols, mask=mask, other=0.0), WIDE)
                tl.store(_buffer(peers_ptr, owner, dtype) + round_base + RANK * slot_numel + (row // WORLD) * N, x, mask=mask)
        for row in range(first, rows, step):
            if row % WORLD == RANK:
                at = row * N
                place = (row // WORLD) * N
                mine = tl.load(x_ptr + at + cols, mask=mask, other=0.0)
                r = mine  # no norm: never read
                if HAS_NORM:
                    r = tl.load(res_ptr + at + cols, mask=mask, other=0.0)
                s = _sum_row(mine, r, own + round_base + place, slot_numel, mask, empty, RANK, WORLD, WIDE, HAS_NORM,
                             BLOCK)
                # Never -0.0, which would read as empty: the float32 sum starts at +0.0, and x + (-x) is +0.0.
                for peer in tl.static_range(WORLD):
                    if peer != RANK:
                        tl.store(_buffer(peers_ptr, peer, dtype) + round_base + RANK * slot_numel + half + place, s,
                                 mask=mask)
                _write_row(s, at, cols, mask, out_ptr, res_ptr, w, N, eps, HAS_NORM)
        for row in range(first, rows, step):
            owner = row % WORLD
            if owner != RANK:
                s = _take(own + round_base + owner * slot_numel + half + (row // WORLD) * N, mask, empty, WIDE)
                _write_row(s, row * N, cols, mask, out_ptr, res_ptr, w, N, eps, HAS_NORM)
    else:
        # Every row this program owns goes out before it waits for any, and it waits only on the
        # peers' programs of its own index: as a GPU starts a grid's programs in index order, those
        # have started or finished, however few programs fit on an SM at once (at 4096 columns one:
        # ~240 registers a thread). PUSHED: the kernel that wrote x sent it.
        if not PUSHED:
            for row in range(first, rows, step):
                at = row * N  # < slot_numel: fits int32
                x = tl.load(x_ptr + at + cols, mask=mask, other=0.0)
                x = as_summand(x, WIDE)
                for peer in tl.static_range(WORLD):
                    if peer != RANK:
                        tl.store(_buffer(peers_ptr, peer, dtype) + round_base + RANK * slot_numel + at, x, mask=mask)

        for row in range(first, rows, step):
            at = row * N  # < slot_numel: fits int32
            # This rank's own part (read where it is, never copied into a slot) and the residual are
            # loaded before the peers' parts are polled for, so they arrive while those cross NVLink.
            mine = tl.load(x_ptr + at + cols, mask=mask, other=0.0)
            r = mine  # no norm: never read
            if HAS_NORM:
                if PUSHED:
                    r = residual_row
                else:
                    r = tl.load(res_ptr + at + cols, mask=mask, other=0.0)
            s = _sum_row(mine, r, own + round_base + at, slot_numel, mask, empty, RANK, WORLD, WIDE, HAS_NORM, BLOCK)
            _write_row(s, at, cols, mask, out_ptr, res_ptr, w, N, eps, HAS_NORM)

    advance_round(round_ptr, turn, step, ROUNDS)


def fits(x: torch.Tensor, slot_numel: int, world: int = 1, two_shot: bool = False) -> bool:
    """Whether the push kernel takes x: rows of its last dimension, each whole in one program, that
    fit a slot (one-shot) or, two-shot, whose owners' shares of them fit half a slot each."""
    if not (x.is_contiguous() and x.dim() >= 1 and x.numel() > 0 and x.shape[-1] <= MAX_NORM_BLOCK
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return False
    n = x.shape[-1]
    return -(-(x.numel() // n) // world) * n <= slot_numel // 2 if two_shot else x.numel() <= slot_numel


def push_all_reduce(
    x: torch.Tensor,
    peers: torch.Tensor,
    rounds: torch.Tensor,
    slot_numel: int,
    rank: int,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    eps: float = 0.0,
    max_programs: int | None = None,
    pushed: bool = False,
    two_shot: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The sum of x over the ranks, in place in x; with a residual and a norm weight, instead
    (rms_norm(sum + residual), sum + residual), the second written into the residual in place.

    `peers` holds the address of every rank's exchange buffer (ROUNDS * world * slot_numel elements
    of x's dtype, all -0.0 before the first call) and `rounds` this rank's round counter (int32 [2],
    zeros before the first call); every rank must make the same sequence of calls. The residual must
    have x's dtype (it is written in place). The grid is one program per row, at most `max_programs`,
    by default two per SM for programs of up to eight warps (rows of up to 4096), one otherwise. They
    need not all be resident at once: a program waits only on the peers' programs of its own index,
    and a GPU starts a grid's programs in index order. Two per SM took 512 rows of 4096 in 17.4 us
    against 19.4 with one (two H200s, 64 calls in a graph).

    pushed: the kernel that wrote x already sent it into the peers' buffers for this round (the
    GEMV's `push`), so this kernel only waits for theirs and sums. That kernel must be the
    one launched just before this one, and the grid must give every row a program of its own.

    two_shot: each row summed by one rank and sent back (`fits(x, slot_numel, world, two_shot=True)`).
    """
    n = x.shape[-1]
    rows = x.numel() // n
    block = triton.next_power_of_2(n)
    has_norm = residual is not None
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device) if has_norm else x
    on = pdl.enabled(x)
    warps = norm_num_warps(block)
    if max_programs is None:
        max_programs = sm_count(x.device) * (2 if warps <= 8 else 1)
    assert not pushed or rows <= max_programs, "a pushed call needs a program for every row"
    assert not (pushed and two_shot), "a pushing GEMV sends one-shot"
    _push_all_reduce_kernel[(min(rows, max_programs),)](
        x, out, residual if has_norm else x, weight if has_norm else x, peers, rounds, rows, slot_numel, n, eps,
        RANK=rank, WORLD=peers.numel(), ROUNDS=ROUNDS, WIDE=x.element_size() == 4, HAS_NORM=has_norm,
        BLOCK=block, PDL=on, PUSHED=pushed, TWO_SHOT=two_shot, num_warps=warps, launch_pdl=on,
    )
    return (out, residual) if has_norm else out
