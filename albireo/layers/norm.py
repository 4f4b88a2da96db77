"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from albireo import kernels
from albireo.distributed.parallel_state import tp_all_reduce, tp_all_reduce_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, sums_ranks: bool = False) -> None:
        """sums_ranks: x arrives as this rank's share of a row-parallel layer's output, whose
        all-reduce was left to the norm so that it can run in one kernel with the add and norm."""
        super().__init__()
        self.eps = eps
        self.sums_ranks = sums_ranks
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if self.sums_ranks:
            fused = None if residual is None else tp_all_reduce_rms_norm(x, residual, self.weight, self.eps)
            if fused is not None:
                return fused
            x = tp_all_reduce(x)
        if kernels.fused_on(x):
            from albireo.kernels.triton_fused import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
