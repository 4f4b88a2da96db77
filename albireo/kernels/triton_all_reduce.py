"""One-shot all-reduce in one kernel, with no barrier: every rank pushes its rows into every peer's
buffer and sums what lands in its own (the Lamport scheme, as TensorRT-LLM's small all-reduce).

Each rank owns an exchange buffer mapped into every peer's address space (torch symmetric memory,
CUDA IPC): ROUNDS rounds x world slots x `slot_numel` elements. Empty elements hold -0.0. In a call,
rank r writes its partial sums (any -0.0 turned into +0.0, which sums the same) into slot r of the
current round in every rank's buffer, then polls its own buffer's slots until no element is -0.0
any more, adds them in rank order and writes -0.0 back behind it. Since each element is written once
per round, "not -0.0" means "this peer's value arrived": no flags, no barrier, one launch.

The round lives in device memory (a counter the call's last program advances), not in Python, so a
CUDA graph replays the right round whatever number of calls it captured. Reusing a round's buffer
is safe: a peer writes it again only three calls later, after it has read this rank's values of the
two calls in between, which this rank wrote only after it finished reading (and emptying) this one.

With a residual and a norm weight, the sum goes straight on into the residual add and the RMSNorm
that follow a row-parallel layer (as `albireo.kernels.triton_fused.rms_norm`, same roundings).

`gemv_push_all_reduce` goes one kernel further back, for a batch-1 decode step's row-parallel
layers: the GEMV (`albireo.kernels.triton_gemv`) and the push are one grid. Every GEMV program
pushes its few output features into every rank's buffer as soon as it has them, so the exchange
runs under the rest of the GEMV, and the program that finishes last (an atomic count) sums the
round, adds and normalizes. Only that program ever waits, and only on peers' programs, which wait
on nothing; so the grid may be any size, unlike the push kernel's. It uses the same buffers, slots
and round counter as `push_all_reduce`, so calls of the two kernels may follow one another in any
order, in or out of a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from albireo.kernels import pdl, sm_count
from albireo.kernels.triton_fused import MAX_NORM_BLOCK, norm_num_warps, rms_normalize
from albireo.kernels.triton_gemv import MAX_ROWS, _accumulate, config_for

ROUNDS = 3


@triton.jit
def _empty(v, WIDE: tl.constexpr):
    """Which elements still hold -0.0, the mark of a slot no peer has written this round."""
    if WIDE:
        return v.to(tl.int32, bitcast=True) == -2147483648
    else:
        return v.to(tl.int16, bitcast=True) == -32768


@triton.jit
def _collect_row(own, round_base, at, empty, mask, slot_numel, WORLD: tl.constexpr, WIDE: tl.constexpr):
    """One row's sum over the ranks (the row at `at` of the round at `round_base` of this rank's
    buffer `own`), shared by both kernels so that fused and unfused calls add alike: it waits for
    every rank's values, adds them in rank order in float32, rounds to the buffer's dtype, and
    empties the slots behind it for the round's next use."""
    total = tl.zeros(mask.shape, dtype=tl.float32)
    for src in tl.static_range(WORLD):
        slot = own + round_base + src * slot_numel + at
        v = tl.load(slot, mask=mask, other=0.0, volatile=True)
        while tl.max((_empty(v, WIDE) & mask).to(tl.int32), axis=0) > 0:
            v = tl.load(slot, mask=mask, other=0.0, volatile=True)
        total += v.to(tl.float32)
        tl.store(slot, empty, mask=mask)
    return total.to(own.dtype.element_ty)


@triton.jit
def _finish_row(s, out_ptr, res_ptr, w_ptr, at, cols, mask, N, eps, HAS_NORM: tl.constexpr):
    """A summed row's end, shared by both kernels so that they round alike: s as it is, or
    (HAS_NORM) added to the residual in place and RMS-normalized, rounded where the unfused layers
    round."""
    if HAS_NORM:
        r = tl.load(res_ptr + at + cols, mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(s.dtype)
        tl.store(res_ptr + at + cols, s, mask=mask)
        s = rms_normalize(s, w_ptr, cols, mask, N, eps)
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
):
    pdl.wait_for_previous(PDL)
    first = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dtype = x_ptr.dtype.element_ty
    if WIDE:
        empty = tl.full([BLOCK], -2147483648, tl.int32).to(dtype, bitcast=True)
    else:
        empty = tl.full([BLOCK], -32768, tl.int16).to(dtype, bitcast=True)
    turn = tl.load(round_ptr)
    round_base = turn.to(tl.int64) * WORLD * slot_numel + cols

    # Every row this program owns goes out before it waits for any: a program never waits on a
    # peer's program that cannot run, as long as all programs fit on the GPU at once (the grid is
    # at most one per SM).
    for row in range(first, rows, step):
        at = row * N  # < slot_numel: fits int32
        x = tl.load(x_ptr + at + cols, mask=mask, other=0.0)
        x = tl.where(_empty(x, WIDE), 0.0, x).to(dtype)
        for peer in tl.static_range(WORLD):
            # The hint lets the stores to the peer go out as 16-byte vectors, not element by element.
            buffer = tl.multiple_of(tl.load(peers_ptr + peer).to(tl.pointer_type(dtype)), 16)
            tl.store(buffer + round_base + RANK * slot_numel + at, x, mask=mask)

    own = tl.multiple_of(tl.load(peers_ptr + RANK).to(tl.pointer_type(dtype)), 16)
    for row in range(first, rows, step):
        at = row * N  # < slot_numel: fits int32
        s = _collect_row(own, round_base, at, empty, mask, slot_numel, WORLD, WIDE)
        _finish_row(s, out_ptr, res_ptr, w_ptr, at, cols, mask, N, eps, HAS_NORM)

    # The last program to finish moves this rank on to the next round; every program read the
    # round before it arrived here, and the next call starts only after this kernel has ended.
    if tl.atomic_add(round_ptr + 1, 1) == step - 1:
        tl.store(round_ptr + 1, 0)
        tl.store(round_ptr, (turn + 1) % ROUNDS)


def fits(x: torch.Tensor, slot_numel: int) -> bool:
    """Whether the push kernel takes x: rows of its last dimension, each whole in one program."""
    return (x.is_contiguous() and x.dim() >= 1 and 0 < x.numel() <= slot_numel
            and x.shape[-1] <= MAX_NORM_BLOCK and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The sum of x over the ranks, in place in x; with a residual and a norm weight, instead
    (rms_norm(sum + residual), sum + residual), the second written into the residual in place.

    `peers` holds the address of every rank's exchange buffer (ROUNDS * world * slot_numel elements
    of x's dtype, all -0.0 before the first call) and `rounds` this rank's round counter (int32 [2],
    zeros before the first call); every rank must make the same sequence of calls. The residual must
    have x's dtype (it is written in place). The grid is one program per row, at most `max_programs`
    (by default one per SM, so that every program is on the GPU at once while it waits).
    """
    n = x.shape[-1]
    rows = x.numel() // n
    block = triton.next_power_of_2(n)
    has_norm = residual is not None
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device) if has_norm else x
    on = pdl.enabled(x)
    _push_all_reduce_kernel[(min(rows, max_programs or sm_count(x.device)),)](
        x, out, residual if has_norm else x, weight if has_norm else x, peers, rounds, rows, slot_numel, n, eps,
        RANK=rank, WORLD=peers.numel(), ROUNDS=ROUNDS, WIDE=x.element_size() == 4, HAS_NORM=has_norm,
        BLOCK=block, PDL=on, num_warps=norm_num_warps(block), launch_pdl=on,
    )
    return (out, residual) if has_norm else out


@triton.jit
def _gemv_push_all_reduce_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    res_ptr,
    norm_w_ptr,
    peers_ptr,  # int64 [world]: the address of each rank's exchange buffer
    round_ptr,  # int32 [2], this rank's: the current round, and how many programs have finished it
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    slot_numel,
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    ROUNDS: tl.constexpr,
    WIDE: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """_gemv_kernel, then the push all-reduce of its output with the residual add and RMSNorm, in
    one grid: each program pushes its BLOCK_N outputs of all M rows the moment it has them, and the
    last program to finish sums the round and normalizes the rows.

    One num_warps serves both halves, and Triton's reductions add in an order set by it. It is the
    GEMV config's, so the GEMV sums K exactly as gemv does (same layouts, same instructions) and the
    all-reduced sum and the residual are bit for bit push_all_reduce's. The finisher's row is then
    summed for the variance as rms_norm sums it only where norm_num_warps(BLOCK) is that count too
    (with the 4-warp configs, rows of at most 1024); for the 4096-wide rows of an 8B model it takes
    4 warps where rms_norm takes 8, so the variance may differ in its last bit, and with it, rarely,
    an element of the normed output (by a bf16 step or two).
    The other way round would be worse: 8 warps would change the GEMV's order and so the sum that
    both outputs and the residual stream carry on. At 4 warps the finisher holds 32 elements of a
    4096-wide row per thread (16 at 8); it waits on a handful of dependent round trips to memory
    either way, so the count hardly moves its time. Its registers matter more: ptxas (sm_90) gives
    this kernel 234 per thread for o_proj's config (2, 2048, 4, 3) at M=1, where gemv needs 113, so
    two programs would share an SM instead of four; the wrapper caps it at 128 (16 bytes spill),
    keeping gemv's four. With down_proj's (8, 1024, 4, 3) gemv alone needs 211 and the kernel 242:
    two programs per SM either way, no cap.
    """
    # The GEMV, as _gemv_kernel: BLOCK_N output features of all M rows per program.
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    pdl.wait_for_previous(PDL)
    # Read once, here: the finisher advances it, and may do so while other programs' stores are
    # still on their way (never before each of them read it; see the finisher below).
    turn = tl.load(round_ptr)
    acc = _accumulate(tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32), w, x_ptr, rows, row_ok, ks, k_ok, K,
                      stride_xm, SILU_MUL)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _accumulate(acc, w, x_ptr, rows, row_ok, ks, k_ok, K, stride_xm, SILU_MUL)
    dtype = x_ptr.dtype.element_ty
    # Rounded as gemv stores it, then -0.0 made +0.0 as push_all_reduce sends it.
    y = tl.sum(acc, axis=2).to(dtype)
    y = tl.where(_empty(y, WIDE), 0.0, y).to(dtype)

    # Out to slot RANK of the round in every rank's buffer, own included, at push_all_reduce's offsets.
    round_base = turn.to(tl.int64) * WORLD * slot_numel
    at = rows[:, None] * N + cols[None, :]  # < slot_numel: fits int32
    ok = row_ok[:, None] & col_ok[None, :]
    for peer in tl.static_range(WORLD):
        buffer = tl.multiple_of(tl.load(peers_ptr + peer).to(tl.pointer_type(dtype)), 16)
        tl.store(buffer + round_base + RANK * slot_numel + at, y, mask=ok)

    # The last program to get here sums the round. No other program waits for anything, so every
    # program but this one runs to its end whatever the grid's size and however few fit on the GPU
    # at once, and this one waits only on peers' programs, which wait on nothing either.
    # What it reads of its own slot other programs of this grid wrote. The atomic orders those
    # stores before its reads (acq_rel at gpu scope, one thread per program, between CTA barriers
    # that Triton 3.6 emits around it: the release covers the stores of all a program's threads,
    # the acquire the loads of all the finisher's), but the reads do not rely on that: they spin
    # per element until it is no longer -0.0, and an element is written once per round, so
    # whatever is not -0.0 is this round's value, however late it lands (as in the peers' slots,
    # which nothing else orders). That spin is also why no program reads `turn` after the round
    # moves on: every thread that stores an element read `turn` before it stored the element into
    # the finisher's own slot, and the finisher advances the round only once it has seen them all.
    if tl.atomic_add(round_ptr + 1, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        fcols = tl.arange(0, BLOCK)
        fmask = fcols < N
        if WIDE:
            empty = tl.full([BLOCK], -2147483648, tl.int32).to(dtype, bitcast=True)
        else:
            empty = tl.full([BLOCK], -32768, tl.int16).to(dtype, bitcast=True)
        own = tl.multiple_of(tl.load(peers_ptr + RANK).to(tl.pointer_type(dtype)), 16)
        for row in range(M):
            row_at = row * N
            s = _collect_row(own, round_base + fcols, row_at, empty, fmask, slot_numel, WORLD, WIDE)
            _finish_row(s, out_ptr, res_ptr, norm_w_ptr, row_at, fcols, fmask, N, eps, True)
        # As the push kernel ends a round: the next call, of either kernel, starts only after this
        # grid has ended, so it reads these.
        tl.store(round_ptr + 1, 0)
        tl.store(round_ptr, (turn + 1) % ROUNDS)


def gemv_push_all_reduce(
    x: torch.Tensor,
    w: torch.Tensor,
    peers: torch.Tensor,
    rounds: torch.Tensor,
    slot_numel: int,
    rank: int,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    silu_mul: bool = False,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-parallel layer's GEMV, all-reduce, residual add and RMSNorm in one kernel:
    (rms_norm(sum + residual), sum + residual) of sum = the all-reduce of gemv(x, w, silu_mul),
    the second in place in the residual. The residual comes out bit for bit as gemv then
    push_all_reduce leave it; the normed output too where norm_num_warps(next_power_of_2(N)) is
    the GEMV config's num_warps, else it may differ in the last bit of a rare element (the kernel
    says why).

    One launch instead of two, and each program's outputs go to the peers as soon as it has them,
    so the exchange runs under the rest of the GEMV. It shares push_all_reduce's buffers and round
    counter (`peers`, `rounds`, `slot_numel`, `rank` as there), so the two may follow each other
    in any order. x, w and `config` are as gemv's; residual is [M, N], contiguous, of x's dtype.
    """
    m = x.shape[0]
    n, k = w.shape
    assert m <= MAX_ROWS and x.shape[1] == (2 * k if silu_mul else k), "x does not match the weight"
    assert w.stride(1) == 1 and x.stride(1) == 1, "the K dimension must be contiguous"
    assert 0 < m * n <= slot_numel, "the output does not fit a slot of the exchange buffer"
    assert residual.shape == (m, n) and residual.is_contiguous() and residual.dtype == x.dtype
    block = triton.next_power_of_2(n)
    assert block <= MAX_NORM_BLOCK, "a row must fit one program"
    weight = weight.contiguous()
    out = torch.empty(m, n, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block_n, block_k, num_warps, num_stages = config or config_for(k)
    block_m = triton.next_power_of_2(m)
    # See the kernel's note on registers: where the GEMV's accumulator is small, the finisher's rows
    # would set the register count and halve how many programs share an SM.
    small = block_m * block_n * block_k <= 32 * 32 * num_warps
    on = pdl.enabled(x)
    _gemv_push_all_reduce_kernel[(triton.cdiv(n, block_n),)](
        x, w, out, residual, weight, peers, rounds, m, n, k, x.stride(0), w.stride(0), slot_numel, eps,
        RANK=rank, WORLD=peers.numel(), ROUNDS=ROUNDS, WIDE=x.element_size() == 4, SILU_MUL=silu_mul,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK=block, PDL=on,
        num_warps=num_warps, num_stages=num_stages, maxnreg=128 if small else None, launch_pdl=on,
    )
    return out, residual
