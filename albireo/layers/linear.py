"""Linear layers split over the tensor-parallel group.

Column-parallel layers keep a slice of the output features and need no communication; a
row-parallel layer keeps a slice of the input features and sums partial results with one
all-reduce. Each parameter carries a `weight_loader` that cuts its rank's slice out of a full
checkpoint tensor, so a rank never holds more than its share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from albireo import kernels
from albireo.distributed.copy_engine_all_reduce import SplitSum
from albireo.distributed.parallel_state import (
    tp_all_reduce,
    tp_all_reduce_rms_norm,
    tp_copy_engine_all_reduce,
    tp_push_rms_norm,
    tp_rank,
    tp_size,
)
from albireo.layers.norm import RMSNorm

_HALF = (torch.bfloat16, torch.float16)
# A/B switch for the residual add inside the matmul (RowParallelLinear at TP=1): ALBIREO_GEMM_RESIDUAL=0.
GEMM_RESIDUAL = os.environ.get("ALBIREO_GEMM_RESIDUAL", "1") != "0"
GEMM_RESIDUAL_MAX_INNER = 8192
# A/B switch for the batch-1 GEMV that sends its part of the all-reduce itself (under TP): ALBIREO_GEMV_PUSH=0.
GEMV_PUSH = os.environ.get("ALBIREO_GEMV_PUSH", "1") != "0"


def _gemv_takes(x: torch.Tensor) -> bool:
    """A single half-precision row on CUDA (a batch-1 decode step): the Triton GEMV streams the
    weight faster than cuBLAS at one row and applies silu_mul as it reads x."""
    return kernels.fused_on(x) and x.dim() == 2 and x.shape[0] == 1 and x.dtype in _HALF


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    """x W^T + b. With silu_mul, x is a fused [gate | up] and the product is silu(gate) * up W^T.
    One row goes through the Triton GEMV (`_gemv_takes`)."""
    if _gemv_takes(x):
        from albireo.kernels.triton_gemv import gemv

        y = gemv(x, weight, silu_mul)
        return y if bias is None else y + bias
    if silu_mul:
        x = silu_and_mul(x)
    return F.linear(x, weight, bias)


def _gemm_adds_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether a matmul of x (not a one-row GEMV) by weight accumulates into the residual in place:
    at TP=1 only, where no rank's part is still to be summed. Not past GEMM_RESIDUAL_MAX_INNER input
    features: there cuBLAS picked slower kernels with beta = 1 (llama-3.1-8b's down_proj, 14336
    wide: 820 vs 717 us at 4096 rows on an H100), where the others ran up to 9% faster at prefill
    sizes (bench/gemm_residual.py, benchmarks/results/gemm-residual-*)."""
    return (GEMM_RESIDUAL and tp_size() == 1 and kernels.fused_on(x) and x.dim() == 2 and x.shape[0] > 1
            and x.dtype in _HALF and weight.shape[1] <= GEMM_RESIDUAL_MAX_INNER
            and residual is not None and residual.dtype == x.dtype and residual.is_contiguous())


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [gate | up] tensor."""
    if kernels.fused_on(gate_up):
        from albireo.kernels import triton_fused

        return triton_fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass
class SplitRows:
    """norm(sum + residual) of a row-parallel layer whose all-reduce the copy engines split by rows
    (at a prefill step under TP): each rank adds, and normalizes, only its own rows, and the peers'
    normalized rows come over NVLink. A column-parallel layer multiplies this rank's rows while the
    peers' are on their way; `whole` gives them all at once. Either takes the sum once. The norm
    writes sum + residual into `residual` in this rank's rows only: the next split norm reads no
    others."""

    sum: SplitSum
    norm: RMSNorm
    residual: torch.Tensor

    def _own_rows(self) -> torch.Tensor:
        from albireo.kernels.triton_fused import rms_norm

        mine, theirs = self.sum.scattered()
        lo, hi = self.sum.own
        rows = rms_norm(mine, self.norm.weight, self.norm.eps, self.residual[lo:hi], addend=theirs)[0]
        self.sum.share(rows)
        return rows

    def multiply(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The normalized rows x W^T + b."""
        lo, hi = self.sum.own
        out = torch.empty(self.residual.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device)
        torch.matmul(self._own_rows(), weight.t(), out=out[lo:hi])
        before, after = self.sum.gathered(self.residual.shape[1])
        for rows, into in ((before, out[:lo]), (after, out[hi:])):
            if rows.shape[0]:
                torch.matmul(rows, weight.t(), out=into)
        return out if bias is None else out.add_(bias)

    def whole(self) -> torch.Tensor:
        lo, hi = self.sum.own
        out = torch.empty_like(self.residual)
        out[lo:hi] = self._own_rows()
        out[:lo], out[hi:] = self.sum.gathered(self.residual.shape[1])
        return out


def whole(x: torch.Tensor | SplitRows) -> torch.Tensor:
    """x, with every row of it there."""
    return x.whole() if isinstance(x, SplitRows) else x


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise RuntimeError(f"expected shape {tuple(expected)}")


def _parameter(*shape: int, loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across ranks."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        tp = tp_size()
        for size in output_sizes:
            if size % tp:
                raise ValueError(f"output size {size} is not divisible by tensor_parallel_size {tp}")
        self.input_size = input_size
        # Sizes of the sub-matrices as the checkpoint stores them.
        self.full_sizes = list(output_sizes)
        self.local_sizes = [size // tp for size in output_sizes]
        self.weight = _parameter(sum(self.local_sizes), input_size, loader=self.load_shard)
        self.bias = _parameter(sum(self.local_sizes), loader=self.load_shard) if bias else None

    def shard_range(self, shard_id: int) -> tuple[int, int, int]:
        """(offset in this rank's parameter, offset in the full tensor, length) of a sub-matrix."""
        local = self.local_sizes[shard_id]
        return sum(self.local_sizes[:shard_id]), tp_rank() * local, local

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        check_shape(loaded, (self.full_sizes[shard_id], *param.shape[1:]))
        dst, src, length = self.shard_range(shard_id)
        param.data.narrow(0, dst, length).copy_(loaded.narrow(0, src, length))

    def forward(self, x: torch.Tensor | SplitRows) -> torch.Tensor:
        if isinstance(x, SplitRows):
            return x.multiply(self.weight, self.bias)
        return linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q, k and v projections; KV heads are replicated when ranks outnumber them."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp = tp_size()
        if num_heads % tp:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tensor_parallel_size {tp}")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads {num_kv_heads} and tensor_parallel_size {tp}: one must divide the other"
            )
        self.num_kv_heads_total = num_kv_heads
        self.local_kv_heads = max(1, num_kv_heads // tp)
        self.head_dim = head_dim
        kv_size = self.local_kv_heads * head_dim * tp
        super().__init__(hidden_size, [num_heads * head_dim, kv_size, kv_size], bias)
        self.full_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]

    def shard_range(self, shard_id: int) -> tuple[int, int, int]:
        dst, src, length = super().shard_range(shard_id)
        if shard_id > 0:
            # Ranks sharing a replicated KV head read the same slice of the checkpoint.
            first_head = tp_rank() * self.num_kv_heads_total // tp_size()
            src = first_head * self.head_dim
        return dst, src, length


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, then + b: W's columns (input features) split across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        tp = tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {tp}")
        self.local_input = input_size // tp
        self.input_size = input_size
        self.weight = _parameter(output_size, self.local_input, loader=self.load_weight)
        self.bias = _parameter(output_size, loader=self.load_bias) if bias else None

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        check_shape(loaded, (param.shape[0], self.input_size))
        param.data.copy_(loaded.narrow(1, tp_rank() * self.local_input, self.local_input))

    def load_bias(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        check_shape(loaded, param.shape)
        param.data.copy_(loaded)

    def forward(
        self, x: torch.Tensor, silu_mul: bool = False, residual: torch.Tensor | None = None, norm: RMSNorm | None = None
    ) -> torch.Tensor | tuple[torch.Tensor | SplitRows, torch.Tensor]:
        """The sum over ranks, + b. With silu_mul, x is a fused [gate | up] whose silu(gate) * up is
        the input. With `norm` (the RMSNorm after this layer) and the residual stream, returns
        instead (norm(sum + residual), sum + residual), the all-reduce, the add and the norm in one
        kernel where peer memory takes the all-reduce. A prefill step's large output is summed by
        the copy engines split by rows, each rank normalizing its own (the first of the pair is then
        SplitRows, for a column-parallel layer, and the residual is updated when it is read)."""
        copy_engines = tp_copy_engine_all_reduce(x.shape[0], self.weight.shape[0], x.dtype) if x.dim() == 2 else None
        if copy_engines is not None:
            split = copy_engines.linear(silu_and_mul(x) if silu_mul else x, self.weight)
            if norm is not None and self.bias is None and kernels.fused_on(split.mine):
                return SplitRows(split, norm, residual), residual
            y = split.total()
        else:
            if norm is not None and self.bias is None and _gemm_adds_residual(x, self.weight, residual):
                # With nothing to sum over ranks, cuBLAS adds the product into the residual stream as
                # it writes it (beta = 1): the norm then reads one tensor and writes one, not two each.
                residual.addmm_(silu_and_mul(x) if silu_mul else x, self.weight.t())
                return norm(residual), residual
            if norm is not None and self.bias is None and GEMV_PUSH and tp_size() > 1 and _gemv_takes(x):
                y = torch.empty(1, self.weight.shape[0], dtype=x.dtype, device=x.device)
                symm = tp_push_rms_norm(y, residual)
                if symm is not None and symm.fits_one_shot(y):
                    # The GEMV sends its part to the peers as its programs finish, so it crosses
                    # NVLink under the GEMV's tail instead of after it; the kernel after it only waits
                    # for theirs, adds and normalizes (W3 at TP=2 on two H200s: 0.677 s against 0.710).
                    from albireo.kernels.triton_gemv import gemv

                    gemv(x, self.weight, silu_mul, out=y, push=symm.push_target)
                    return symm.push(y, residual, norm.weight, norm.eps, pushed=True)
            y = linear(x, self.weight, silu_mul=silu_mul)
            if norm is not None and self.bias is None:
                fused = tp_all_reduce_rms_norm(y, residual, norm.weight, norm.eps)
                if fused is not None:
                    return fused
            y = tp_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y if norm is None else norm(y, residual)
