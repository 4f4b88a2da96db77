"""y = x W^T for one row of x: the matrix-vector products of a batch-1 decode step.

At batch 1 a decode step's linear layers only stream their weights, so the floor is the weight
bytes over memory bandwidth. On an H100, cuBLAS ran the projections of a Llama-3.1-8B layer at
2.1-2.9 TB/s and this kernel at 2.5-3.15 TB/s on every shape, TP=1 and TP=2, while at 4 rows
cuBLAS won everywhere (benchmarks/results/decode-gemm-h100.json, bench/decode_gemm.py); so the
linear layers call it for a single row only.

Each program owns BLOCK_N output features and walks the whole of K, keeping a [BLOCK_M, BLOCK_N,
BLOCK_K] float32 partial sum that is reduced once at the end: the loop body is loads and
multiply-adds with no cross-lane reduction, and no split-K pass follows. With SILU_MUL the input
row is a fused gate_up output [gate | up] and the kernel computes silu(gate) * up as it reads it
(rounded where torch rounds), which saves the down projection a separate activation kernel.

Under TP a row-parallel projection's output is one rank's part of a sum. Given `push` (its
exchange slots), the kernel also writes its outputs into every peer's exchange buffer of the
one-shot all-reduce (`albireo/kernels/triton_all_reduce.py`) as each program finishes, so the
values cross NVLink while the last programs still stream weights, and the all-reduce kernel after
it only waits for what its peers pushed (an H200 pair spent ~6 us a call from the GEMV's end to the
sum's at batch 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from albireo.kernels import pdl
from albireo.kernels.triton_all_reduce import ExchangeSlots, as_summand

__all__ = ["CONFIGS", "MAX_ROWS", "config_for", "gemv"]

# The measurement covered up to 4 rows; past that a tensor-core GEMM reuses each weight tile.
MAX_ROWS = 4

# (BLOCK_N, BLOCK_K, num_warps, num_stages), as bench/decode_gemm.py compares them. Every program
# reads all of x from L2, so fewer output features per program mean more x traffic: on an H100 two
# per program won for K <= 4096, and for longer rows (the down projection, whose x is twice as long
# with silu_mul) eight, which reads x a quarter as often at the same speed (`config_for`).
CONFIGS = [
    (2, 2048, 4, 3),
    (8, 1024, 4, 3),
    (4, 1024, 4, 3),
    (4, 2048, 8, 3),
    (4, 1024, 4, 4),
    (8, 512, 4, 3),
    (16, 256, 4, 4),
]


@triton.jit
def _accumulate(acc, w, x_ptr, rows, row_ok, ks, k_ok, K, stride_xm, SILU_MUL: tl.constexpr):
    """acc + the products of one K tile of x (silu(gate) * up with SILU_MUL) with the weight tile w."""
    x_at = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    x_ok = row_ok[:, None] & k_ok[None, :]
    x = tl.load(x_at, mask=x_ok, other=0.0)
    if SILU_MUL:
        g = x.to(tl.float32)
        up = tl.load(x_at + K, mask=x_ok, other=0.0).to(tl.float32)
        # torch: F.silu(gate) is rounded to the activation dtype, then so is the product.
        act = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
        x = (act * up).to(x.dtype)
    return acc + x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    peers_ptr, round_ptr, slot_numel,
    SILU_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr, PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, WIDE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    # The weights do not depend on the kernel before this one: the first tile is read while that
    # kernel finishes (under PDL), and only x waits for it.
    w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    pdl.wait_for_previous(PDL)
    acc = _accumulate(tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32), w, x_ptr, rows, row_ok, ks, k_ok, K,
                      stride_xm, SILU_MUL)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _accumulate(acc, w, x_ptr, rows, row_ok, ks, k_ok, K, stride_xm, SILU_MUL)
    y = tl.sum(acc, axis=2).to(y_ptr.dtype.element_ty)
    y_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y, mask=y_ok)
    if PUSH:
        # Slot RANK of this round in every peer's buffer, laid out as y [M, N]. The round was last
        # moved by an all-reduce kernel that finished before this kernel's wait above returned.
        y = as_summand(y, WIDE)
        turn = tl.load(round_ptr)
        at = turn.to(tl.int64) * WORLD * slot_numel + RANK * slot_numel + rows[:, None] * N + cols[None, :]
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                buffer = tl.load(peers_ptr + peer).to(tl.pointer_type(y_ptr.dtype.element_ty))
                tl.store(buffer + at, y, mask=y_ok)


def config_for(k: int) -> tuple[int, int, int, int]:
    return CONFIGS[0] if k <= 4096 else CONFIGS[1]


def gemv(
    x: torch.Tensor, w: torch.Tensor, silu_mul: bool = False, config: tuple[int, int, int, int] | None = None,
    out: torch.Tensor | None = None, push: ExchangeSlots | None = None,
) -> torch.Tensor:
    """x [M, K] with M <= MAX_ROWS, w [N, K] -> x @ w.T, [M, N] in x's dtype (into `out` if given).

    With silu_mul, x is [M, 2K] holding [gate | up] and the product is silu(gate) * up @ w.T. With
    `push`, the product also goes into this rank's slot in every peer's one-shot exchange buffer:
    the all-reduce that sums it must then be told so (`push_all_reduce(..., pushed=True)`).
    """
    m = x.shape[0]
    n, k = w.shape
    assert m <= MAX_ROWS and x.shape[1] == (2 * k if silu_mul else k), "x does not match the weight"
    assert w.stride(1) == 1 and x.stride(1) == 1, "the K dimension must be contiguous"
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    assert y.shape == (m, n) and y.dtype == x.dtype and y.is_contiguous(), "out must be a contiguous [M, N] of x's dtype"
    assert push is None or m * n <= push.slot_numel, "the product does not fit an exchange slot"
    block_n, block_k, num_warps, num_stages = config or config_for(k)
    on = pdl.enabled(x)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        *((push.peers, push.rounds, push.slot_numel) if push is not None else (y, y, 0)),
        SILU_MUL=silu_mul, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, PDL=on,
        PUSH=push is not None, RANK=push.rank if push is not None else 0,
        WORLD=push.peers.numel() if push is not None else 1, WIDE=x.element_size() == 4,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=on,
    )
    return y
