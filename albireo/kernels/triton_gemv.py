"""y = x W^T for a handful of rows of x: the matrix-vector products of a small decode batch.

At batch 1 a decode step's linear layers only stream their weights; the floor is the weight
bytes over memory bandwidth. cuBLAS reaches it on most shapes of a Llama layer, but not on all
(the 4096 x 4096 output projection of an 8B model ran at about half of it on an H100), so the
runner times both on each shape it captures and keeps the faster (`LinearDispatch`).

Each program owns BLOCK_N output features and walks the whole of K, keeping a [BLOCK_M, BLOCK_N,
BLOCK_K] float32 partial sum that is reduced once at the end, so the loop body is loads and
multiply-adds with no cross-lane reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gemv", "CONFIGS", "MAX_ROWS"]

# Beyond this many rows the weight tile is reused enough for a tensor-core GEMM to win.
MAX_ROWS = 4

# (BLOCK_N, BLOCK_K, num_warps, num_stages): the shapes tried per weight shape.
CONFIGS = [
    (4, 1024, 4, 3),
    (8, 512, 4, 3),
    (8, 1024, 8, 3),
    (16, 512, 8, 3),
    (16, 256, 4, 4),
    (32, 256, 8, 3),
]


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int] = CONFIGS[1]) -> torch.Tensor:
    """x [M, K] with M <= MAX_ROWS, w [N, K] (rows contiguous) -> x @ w.T, [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    assert m <= MAX_ROWS and w.shape[1] == k and w.stride(1) == 1 and x.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps, num_stages = config
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y
