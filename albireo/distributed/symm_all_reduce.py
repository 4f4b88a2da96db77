"""All-reduce of small tensors over peer GPU memory, for the latency-bound all-reduces of decode.

A decode step of a TP model makes two all-reduces per layer of only batch x hidden values; NCCL
spends ~20 us on each even inside a CUDA graph. Here every rank owns a buffer in PyTorch's
symmetric memory (mapped into each peer's address space through CUDA IPC, no multicast), copies
its input into it, and one kernel reads the peers' buffers and sums (one-shot), or reduce-scatters
and all-gathers through them (two-shot, for mid sizes). Both kernels open with a barrier over the
ranks' signal pads, so they are safe inside CUDA graphs. Tensors past `max_bytes` go to NCCL.

One-shot has no closing barrier: a fast rank could refill its buffer while a slow peer still reads
the last call's values. Two buffers used in turn close that race: before a rank writes a buffer
again it has passed the next call's opening barrier, which every peer reaches only after
finishing the call that read it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ONE_SHOT_MAX_BYTES = 256 * 1024
MAX_BYTES = 8 * 2**20


class SymmMemAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.one_shot_max_numel = ONE_SHOT_MAX_BYTES // dtype.itemsize
        self.buffers = []
        for _ in range(2):
            buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
            symm_mem.rendezvous(buffer, group)
            self.buffers.append(buffer)
        self.turn = 0

    def fits(self, x: torch.Tensor) -> bool:
        # The kernels move 16-byte vectors: the size must be a whole number of them.
        return (x.dtype == self.dtype and x.is_contiguous() and x.numel() <= self.max_numel
                and (x.numel() * x.element_size()) % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        n = x.numel()
        staged = self.buffers[self.turn][:n]
        staged.copy_(x.reshape(-1))
        if n <= self.one_shot_max_numel:
            self.turn ^= 1
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, out=x.view(-1))
        else:
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
            x.view(-1).copy_(staged)
        return x
