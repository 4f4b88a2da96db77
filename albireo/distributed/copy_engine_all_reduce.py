"""The large all-reduces of a prefill step at TP=2, moved by the copy engines while the GPUs compute,
and split by rows so that each rank normalizes only half of them.

A 16k-token prefill step of an 8B model at TP=2 sums 64 tensors of 128 MiB across the two GPUs.
NCCL moved them at ~276 GB/s with kernels that hold SMs, so they hardly overlapped the matmuls
around them (37 of a 222 ms step on two H200s; bench/row_parallel_allreduce.py). And the residual
add and RMSNorm after each sum ran on every row at every rank: at TP=2 they were the one part of a
prefill step that did not halve (10.7 against 6.3 ms a step at TP=1, two H200s).

So the rows are split between the ranks, rank 0 owning the first half and rank 1 the second (a
reduce-scatter, then an all-gather, as in Megatron's sequence parallelism). A row-parallel layer
multiplies the peer's rows first and a DMA copy on a stream of its own sends them into the peer's
receive buffer over NVLink while the layer's own rows multiply: the copy engines move the bytes,
no SM does. The reader of the sum (`albireo.layers.linear.SplitRows`) adds the peer's part of its
own rows, adds the residual and normalizes those rows only, sends them to the peer the same way,
and multiplies them by the next layer's weight while the peer's normalized rows come in. Each rank
sends half its partial sum and half the normalized rows: as many bytes as a whole partial sum,
with two handshakes. The residual stream is only summed in a rank's own rows, which are the only
ones the next norm reads. a + b rounds the same on both ranks, so both hold the same sums.

A copy ends by raising a flag in the peer's memory (stream memory operations: the GPU's front end
writes and polls them, again without an SM); the reader waits for the flag and lowers it before
it reads. The receive buffer and the flags alternate between two slots by call parity. Both parts
of a call are read before the next row-parallel layer (by the column-parallel layer between them,
or at the model's end). A rank sends call e + 2 only after its matmul of call e + 2, which follows
its wait on the peer's normalized rows of call e + 1, which the peer sent after it had read call
e + 1's scattered part, which follows everything it did with call e's slot: so a slot is never
overwritten while its reader still needs it, nor raised again before it was lowered. The values
are constants and the slot of a call is fixed when it is recorded, so a CUDA graph replays the
handshake as it was captured: every forward makes an even number of calls (two per layer), so
each starts at slot 0.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def above_bytes_from_env() -> int:
    """ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES, 32 MiB by default (tests send tiny models through this path with 0)."""
    value = os.environ.get("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", str(32 * 2**20))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES must be a whole number of bytes, got {value!r}") from None


# Only larger all-reduces take this path. Up to 8 MiB the one-shot push kernel (symm_all_reduce.py)
# beat it in decode graphs (512 rows of 4096: 31.8 against 63.2 us for o_proj with its norm), and
# above that NCCL after the matmul did up to 32 MiB: W2 at TP=2 on two H200s in one call made 18,600
# tok/s with NCCL and 15,716 this way in prefill steps of 4096 tokens (32 MiB), while in steps of
# 8192 (64 MiB) this way won, 19,844 and 19,935 against 18,902 and 18,914
# (benchmarks/results/ce-threshold-h200x2-c85b803.txt). Why the 4096-token steps lost that much
# (their forward 72 against 60 ms, the GPU idle 5.7 ms before each) is not known; it did not come
# back on another pair, where every eager all-reduce this way made 18,856 tok/s at 4096 tokens
# (ce-connections-h200x2-a43d6ae.txt, not an A/B against NCCL).
ABOVE_BYTES = above_bytes_from_env()
# A receive region holds half the largest product, and this much more: the larger half of an odd
# number of rows (half a row, up to 128k features).
_ODD_ROW_SLACK = 2**16

_WAIT_VALUE_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_WRITE_VALUE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: a system-wide fence before the write


class _StreamMemOps:
    """cuStreamWriteValue32 and cuStreamWaitValue32 from the driver (torch does not expose the wait)."""

    def __init__(self) -> None:
        driver = ctypes.CDLL("libcuda.so.1")
        self._write = self._function(driver, "cuStreamWriteValue32")
        self._wait = self._function(driver, "cuStreamWaitValue32")

    @staticmethod
    def _function(driver: ctypes.CDLL, name: str):
        fn = getattr(driver, name + "_v2", None) or getattr(driver, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn

    def write(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        self._check("cuStreamWriteValue32", self._write(stream.cuda_stream, address, value, _WRITE_VALUE_DEFAULT))

    def wait(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        self._check("cuStreamWaitValue32", self._wait(stream.cuda_stream, address, value, _WAIT_VALUE_EQ))

    @staticmethod
    def _check(name: str, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"{name} failed with CUresult {status}")


def split_rows(rows: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(this rank's rows, the peer's rows) as (lo, hi) bounds: rank 0 owns the first rows // 2."""
    first, second = (0, rows // 2), (rows // 2, rows)
    return (first, second) if rank == 0 else (second, first)


class CopyEngineAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int,
                 above_bytes: int = ABOVE_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if dist.get_world_size(group) != 2:
            raise ValueError("the copy-engine all-reduce is for two ranks")
        self.dtype = dtype
        self.above_numel = above_bytes // dtype.itemsize
        self.region_numel = max_bytes // dtype.itemsize // 2 + _ODD_ROW_SLACK
        self.rank = dist.get_rank(group)
        peer = 1 - self.rank
        self.ops = _StreamMemOps()
        self.stream = torch.cuda.Stream(device)

        # Per rank two slots, each a region for the scattered partial sums and one for the gathered
        # normalized rows, and a flag per region; all zero before the first call.
        self.receive = symm_mem.empty(4 * self.region_numel, dtype=dtype, device=device)
        receive = symm_mem.rendezvous(self.receive, group)
        self.own_regions = self.receive.view(2, 2, self.region_numel)
        self.peer_regions = receive.get_buffer(peer, (2, 2, self.region_numel), dtype)
        self.flags = symm_mem.empty(4, dtype=torch.int32, device=device)
        self.flags.zero_()
        torch.cuda.synchronize(device)
        flags = symm_mem.rendezvous(self.flags, group)
        self.own_flag_ptrs = [[flags.buffer_ptrs[self.rank] + 4 * (2 * slot + part) for part in range(2)]
                              for slot in range(2)]
        self.peer_flag_ptrs = [[flags.buffer_ptrs[peer] + 4 * (2 * slot + part) for part in range(2)]
                               for slot in range(2)]
        self.calls = 0
        dist.barrier(group)  # no peer writes into buffers that are not yet zero

    def takes(self, rows: int, features: int, dtype: torch.dtype) -> bool:
        return (dtype == self.dtype and self.above_numel < rows * features and rows >= 2
                and (rows - rows // 2) * features <= self.region_numel)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> SplitSum:
        """x W^T for x [rows, in] and weight [out, in] (`takes` must hold), the peer's rows of it sent
        to the peer; the returned SplitSum must be read (all of it) before the next call."""
        rows = x.shape[0]
        own, peer = split_rows(rows, self.rank)
        out = torch.empty(rows, weight.shape[0], dtype=x.dtype, device=x.device)
        slot = self.calls % 2
        self.calls += 1
        torch.matmul(x[peer[0] : peer[1]], weight.t(), out=out[peer[0] : peer[1]])
        self.send(out[peer[0] : peer[1]], slot, part=0)
        torch.matmul(x[own[0] : own[1]], weight.t(), out=out[own[0] : own[1]])
        return SplitSum(self, slot, out, own, peer)

    def send(self, rows: torch.Tensor, slot: int, part: int) -> None:
        """Copy rows (contiguous) into the peer's region `part` of `slot` once the current stream has
        made them, then raise the region's flag there."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.peer_regions[slot, part, : rows.numel()].view(rows.shape).copy_(rows, non_blocking=True)
        self.ops.write(self.stream, self.peer_flag_ptrs[slot][part], 1)

    def receive_rows(self, slot: int, part: int, shape: tuple[int, int]) -> torch.Tensor:
        """The rows the peer sent into region `part` of `slot`, once the current stream waits for them."""
        main = torch.cuda.current_stream()
        self.ops.wait(main, self.own_flag_ptrs[slot][part], 1)
        self.ops.write(main, self.own_flag_ptrs[slot][part], 0)
        if part == 1:
            main.wait_stream(self.stream)  # this rank's copies read its tensors: they must outlive them
        return self.own_regions[slot, part, : shape[0] * shape[1]].view(shape)


@dataclass
class SplitSum:
    """A row-parallel layer's all-reduce, split by rows between the two ranks: this rank's product
    of every row (`mine`), with the peer's part of this rank's rows (`own`) to come. The reader takes
    `scattered()`, makes its rows of whatever follows, `share`s them and takes the peer's from
    `gathered`: every call must get all of that, in that order."""

    engine: CopyEngineAllReduce
    slot: int
    mine: torch.Tensor
    own: tuple[int, int]
    peer: tuple[int, int]

    def scattered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's part of its own rows, the peer's part of them): their sum is the all-reduce there."""
        lo, hi = self.own
        return self.mine[lo:hi], self.engine.receive_rows(self.slot, 0, (hi - lo, self.mine.shape[1]))

    def share(self, rows: torch.Tensor) -> None:
        """Send this rank's finished rows (of `own`) to the peer."""
        assert rows.dtype == self.engine.dtype and rows.shape[0] == self.own[1] - self.own[0]
        self.engine.send(rows.contiguous(), self.slot, part=1)

    def gathered(self, features: int) -> torch.Tensor:
        """The peer's finished rows (of `peer`), once the current stream waits for them."""
        return self.engine.receive_rows(self.slot, 1, (self.peer[1] - self.peer[0], features))

    def total(self) -> torch.Tensor:
        """The all-reduce of every row, in place in mine."""
        mine, theirs = self.scattered()
        self.share(mine.add_(theirs))
        lo, hi = self.peer
        self.mine[lo:hi].copy_(self.gathered(self.mine.shape[1]))
        return self.mine
