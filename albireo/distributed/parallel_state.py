"""The tensor-parallel group of this process: its rank, its size and the collectives over it.

A process that never joined a group is rank 0 of a group of one, and the collectives are no-ops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from albireo import kernels
from albireo.distributed.copy_engine_all_reduce import CopyEngineAllReduce
from albireo.distributed.symm_all_reduce import SymmMemAllReduce

logger = logging.getLogger(__name__)

# The A/B switch for the copy-engine path of large all-reduces: ALBIREO_CE_ALL_REDUCE=0 sends
# them to NCCL, as before it existed.
copy_engine_all_reduce_on = os.environ.get("ALBIREO_CE_ALL_REDUCE", "1") != "0"

_group: dist.ProcessGroup | None = None
_rank = 0
_size = 1
_symm_all_reduce: SymmMemAllReduce | None = None
_copy_engine_all_reduce: CopyEngineAllReduce | None = None


def set_tensor_parallel_group(group: dist.ProcessGroup | None) -> None:
    global _group, _rank, _size
    _group = group
    _rank = dist.get_rank(group) if group is not None else 0
    _size = dist.get_world_size(group) if group is not None else 1


def tp_group() -> dist.ProcessGroup | None:
    return _group


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _size > 1:
        if _symm_all_reduce is not None and _symm_all_reduce.takes(x):
            return _symm_all_reduce(x)
        dist.all_reduce(x, group=_group)
    return x


def tp_push_rms_norm(x: torch.Tensor, residual: torch.Tensor) -> SymmMemAllReduce | None:
    """The peer-memory all-reduce that sums x, adds the residual and normalizes in one kernel, where
    it takes x (fused kernels on, x fits our push kernel, the residual is like x); else None."""
    if (_size > 1 and _symm_all_reduce is not None and kernels.fused_on(x) and residual.dtype == x.dtype
            and residual.shape == x.shape and residual.is_contiguous() and _symm_all_reduce.fits_push(x)):
        return _symm_all_reduce
    return None


def tp_all_reduce_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(sum of x + residual), sum of x + residual) in one kernel, the second in place in
    residual, where `tp_push_rms_norm` takes x; None elsewhere."""
    symm = tp_push_rms_norm(x, residual)
    return symm.push(x, residual, weight, eps) if symm is not None else None


def tp_copy_engine_all_reduce(rows: int, features: int, dtype: torch.dtype) -> CopyEngineAllReduce | None:
    """The copy-engine path, where it takes a row-parallel layer's [rows, features] output."""
    if _copy_engine_all_reduce is not None and _copy_engine_all_reduce.takes(rows, features, dtype):
        return _copy_engine_all_reduce
    return None


def enable_symm_all_reduce(device: torch.device, dtype: torch.dtype, max_activation_bytes: int = 0) -> bool:
    """Route small all-reduces of `dtype` over peer memory and large ones of up to
    `max_activation_bytes` (a prefill step's) through the copy engines (GPUs only); NCCL stays the
    fallback for the rest and for either path that cannot start."""
    global _symm_all_reduce, _copy_engine_all_reduce
    if _size == 1 or device.type != "cuda":
        return False
    try:
        _symm_all_reduce = SymmMemAllReduce(_group, device, dtype)
    except Exception as e:  # no peer access between these GPUs, or a torch without the kernels
        logger.warning("all-reduce over peer memory unavailable (%s); using NCCL", e)
        _symm_all_reduce = None
    if _symm_all_reduce is not None and copy_engine_all_reduce_on and max_activation_bytes > 0:
        try:
            _copy_engine_all_reduce = CopyEngineAllReduce(_group, device, dtype, max_activation_bytes)
        except Exception as e:  # no stream memory operations in this driver
            logger.warning("all-reduce by the copy engines unavailable (%s); using NCCL for large tensors", e)
            _copy_engine_all_reduce = None
    # Every rank must take the same path for each all-reduce, or they wait on each other forever.
    everywhere = torch.tensor([_symm_all_reduce is not None, _copy_engine_all_reduce is not None],
                              dtype=torch.int32, device=device)
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN, group=_group)
    if not everywhere[0].item():
        _symm_all_reduce = None
    if not everywhere[1].item():
        _copy_engine_all_reduce = None
    if _symm_all_reduce is not None:
        _symm_all_reduce.compile_pick()
    return _symm_all_reduce is not None


def tp_pick_candidates(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
    """Each row's token from every rank's sampling candidates, swapped over peer memory; None where
    that path is off (CPU, NCCL only) or the candidates do not fit it."""
    if _symm_all_reduce is None or not scores.is_cuda:
        return None
    return _symm_all_reduce.pick(scores, indices)


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_size)]
    dist.all_gather(parts, x.contiguous(), group=_group)
    return torch.cat(parts, dim=dim)


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a group meet: rank 0 serves torch's TCP store at addr:port."""

    addr: str
    port: int


def init_distributed(rank: int, world_size: int, rendezvous: Rendezvous, backend: str) -> None:
    """Join the process group (gloo on CPU, nccl on GPUs) and make it this process's TP group.

    The env:// rendezvous, as under torchrun: this process is a worker of its own, so its
    environment is where MASTER_ADDR and MASTER_PORT belong (NCCL's and gloo's own settings, such
    as NCCL_SOCKET_IFNAME, come in the same way from the launching shell).
    """
    os.environ["MASTER_ADDR"] = rendezvous.addr
    os.environ["MASTER_PORT"] = str(rendezvous.port)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    set_tensor_parallel_group(dist.group.WORLD)


def shutdown_distributed() -> None:
    global _symm_all_reduce, _copy_engine_all_reduce
    _symm_all_reduce = _copy_engine_all_reduce = None
    if dist.is_initialized():
        dist.destroy_process_group()
    set_tensor_parallel_group(None)
