"""The large all-reduces of a prefill step at TP=2, moved by the copy engines while the matmul runs.

A 16k-token prefill step of an 8B model at TP=2 sums 64 tensors of 128 MiB across the two GPUs.
NCCL moved them at ~276 GB/s with kernels that hold SMs, so they hardly overlapped the matmuls
around them (37 of a 222 ms step on two H200s; bench/row_parallel_allreduce.py). Here a row-parallel
layer runs its matmul in row chunks of halving sizes, and as each chunk lands a DMA copy on a stream of its own
sends it into the peer's receive buffer over NVLink while the next chunk multiplies: the copy
engines move the bytes, no SM does. After each chunk's copy a rank raises that chunk's flag in the
peer's memory (stream memory operations: the GPU's front end writes and polls them, again without
an SM). The layer returns an `ArrivingSum`: whoever reads it waits for the peer's flag of each
chunk just before it reads that chunk, so the next layer's norm and matmul on the first rows run
while the last rows still cross NVLink (`albireo.layers.linear.ArrivingRows`). The residual add and
RMSNorm add what was received as they read their own partial sum.

Each rank sends its whole partial sum, N bytes, which at two ranks is what a reduce-scatter plus
an all-gather send, with one handshake instead of two; at more ranks a whole copy per peer would
send more than a ring, so this path is for pairs. a + b rounds the same on both ranks, so both
hold the same sum.

The receive buffer and the flags alternate between two slots by call parity. A peer raises a
chunk's flag (writes 1) after that chunk's copy; the rank waits for 1 and lowers it (writes 0)
before it reads the chunk. Every chunk of a call is read before the next row-parallel layer (its
reader is the column-parallel layer between them, or the model's end). A rank sends call e + 2
only after its matmul of call e + 2, which follows its waits on the peer's flags of call e + 1,
which the peer raised after it had sent call e + 1, which it did after it had read (and lowered)
call e's slot: so a slot is never overwritten while its reader still needs it, nor raised again
before it was lowered. The values are constants and the slot of
a call is fixed when it is recorded, so a CUDA graph replays the handshake as it was captured:
every forward makes an even number of calls (two per layer), so each starts at slot 0.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist


def above_bytes_from_env() -> int:
    """ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES, 8 MiB by default (tests send tiny models through this path with 0)."""
    value = os.environ.get("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", str(8 * 2**20))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES must be a whole number of bytes, got {value!r}") from None


# Up to this many bytes the one-shot push kernel (symm_all_reduce.py) takes the all-reduce: the
# copies' fixed costs lost to it in decode graphs up to 512 rows of 4096 and tied at 1024 (8 MiB).
ABOVE_BYTES = above_bytes_from_env()
CHUNKS = 4

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


def chunk_bounds(rows: int, chunks: int) -> list[int]:
    """Row bounds of the matmul's chunks, each half the one before: only the last chunk's copy is
    not hidden under a matmul, and a copy moves its rows ~4x faster than down_proj produces them
    (two H200s), so the chunks can shrink that fast while every copy still ends in time."""
    total = 2**chunks - 1
    return [rows * (total - 2 ** (chunks - i) + 1) // total for i in range(chunks + 1)]


class CopyEngineAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int,
                 above_bytes: int = ABOVE_BYTES, chunks: int = CHUNKS) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if dist.get_world_size(group) != 2:
            raise ValueError("the copy-engine all-reduce is for two ranks")
        self.dtype = dtype
        self.above_numel = above_bytes // dtype.itemsize
        self.max_numel = max_bytes // dtype.itemsize
        self.chunks = chunks
        rank = dist.get_rank(group)
        peer = 1 - rank
        self.ops = _StreamMemOps()
        self.stream = torch.cuda.Stream(device)

        # Two receive slots per rank and a flag per slot and chunk, all zero before the first call.
        self.receive = symm_mem.empty(2 * self.max_numel, dtype=dtype, device=device)
        receive = symm_mem.rendezvous(self.receive, group)
        self.peer_receive = receive.get_buffer(peer, (2, self.max_numel), dtype)
        self.flags = symm_mem.empty(2 * chunks, dtype=torch.int32, device=device)
        self.flags.zero_()
        torch.cuda.synchronize(device)
        flags = symm_mem.rendezvous(self.flags, group)
        self.own_flag_ptrs = [[flags.buffer_ptrs[rank] + 4 * (slot * chunks + c) for c in range(chunks)] for slot in range(2)]
        self.peer_flag_ptrs = [[flags.buffer_ptrs[peer] + 4 * (slot * chunks + c) for c in range(chunks)] for slot in range(2)]
        self.calls = 0
        dist.barrier(group)  # no peer writes into buffers that are not yet zero

    def takes(self, rows: int, features: int, dtype: torch.dtype) -> bool:
        numel = rows * features
        return dtype == self.dtype and self.above_numel < numel <= self.max_numel and rows >= self.chunks

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> ArrivingSum:
        """x W^T for x [rows, in] and weight [out, in] (`takes` must hold), with the peer's x W^T
        arriving chunk by chunk: their sum is the all-reduce. The peer's part lives in a receive
        buffer that the call after next reuses, so it must be read before the next row-parallel layer."""
        rows = x.shape[0]
        out = torch.empty(rows, weight.shape[0], dtype=x.dtype, device=x.device)
        slot = self.calls % 2
        self.calls += 1
        to_peer = self.peer_receive[slot, : out.numel()].view(out.shape)
        main = torch.cuda.current_stream()
        bounds = chunk_bounds(rows, self.chunks)
        for chunk, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            torch.matmul(x[lo:hi], weight.t(), out=out[lo:hi])
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                to_peer[lo:hi].copy_(out[lo:hi], non_blocking=True)
            self.ops.write(self.stream, self.peer_flag_ptrs[slot][chunk], 1)
        received = self.receive.view(2, self.max_numel)[slot, : out.numel()].view(out.shape)
        return ArrivingSum(out, received, bounds, partial(self._arrive, slot))

    def _arrive(self, slot: int, chunk: int) -> None:
        """Make the current stream wait for the peer's copy of a chunk, and lower its flag."""
        main = torch.cuda.current_stream()
        self.ops.wait(main, self.own_flag_ptrs[slot][chunk], 1)
        self.ops.write(main, self.own_flag_ptrs[slot][chunk], 0)
        if chunk == self.chunks - 1:
            main.wait_stream(self.stream)  # the copies read this rank's product: it must outlive them


@dataclass
class ArrivingSum:
    """A row-parallel layer's all-reduce as it arrives: this rank's product (`mine`) and the peer's
    (`theirs`), whose rows land in chunks (`bounds`). Every chunk must be taken once, in order, and
    before the next row-parallel layer."""

    mine: torch.Tensor
    theirs: torch.Tensor
    bounds: list[int]
    arrive: Callable[[int], None]

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Row bounds (lo, hi) of each chunk, once the current stream waits for its arrival."""
        for chunk, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            self.arrive(chunk)
            yield lo, hi

    def wait_all(self) -> None:
        for _ in self.chunks():
            pass

    def total(self) -> torch.Tensor:
        """mine + theirs, in place in mine."""
        self.wait_all()
        return self.mine.add_(self.theirs)
