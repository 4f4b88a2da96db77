"""The large all-reduces of a prefill step under TP, moved by the copy engines while the GPUs
compute, and split by rows so that each rank normalizes only its share of them.

A 16k-token prefill step of an 8B model at TP=2 sums 64 tensors of 128 MiB across the GPUs. NCCL
moved them at ~276 GB/s with kernels that hold SMs, so they hardly overlapped the matmuls around
them (37 of a 222 ms step on two H200s; bench/row_parallel_allreduce.py). And the residual add and
RMSNorm after each sum ran on every row at every rank: they were the one part of a prefill step
that did not shrink with TP (10.7 against 6.3 ms a step at TP=1, two H200s).

So the rows are split between the ranks, rank r owning the r-th of `world` runs of rows (a
reduce-scatter, then an all-gather, as in Megatron's sequence parallelism). A row-parallel layer
multiplies each peer's rows in turn, and a DMA copy on a stream of that peer's sends them into the
peer's receive buffer over NVLink while the next rows multiply, this rank's own last: the copy
engines move the bytes, no SM does. The reader of the sum (`albireo.layers.linear.SplitRows`)
adds the peers' parts of its own rows and the residual, normalizes those rows only, sends them to
every peer the same way, and multiplies them by the next layer's weight while the peers' normalized
rows come in. Each rank sends (world - 1) / world of its partial sum and its normalized rows to
each peer: the bytes of a ring all-reduce, with two handshakes. The residual stream is only summed
in a rank's own rows, which are the only ones the next norm reads. A row is summed by its owner
alone, so every rank holds the same bits of it.

A copy ends by raising a flag of the sender's in the receiver's memory (stream memory operations:
the GPU's front end writes and polls them, again without an SM); the reader waits for every peer's
flag and lowers them before it reads. The receive regions and the flags alternate between two slots
by call parity. Every part of a call is read before the next row-parallel layer (by the
column-parallel layer between them, or at the model's end). A rank sends call e + 2 only after its
matmul of call e + 2, which follows its wait on every peer's normalized rows of call e + 1, which
each peer sent after it had read call e + 1's scattered parts, which follows everything it did with
call e's slot: so a slot is never overwritten while its reader still needs it, nor a flag raised
again before it was lowered. The values are constants and the slot of a call is fixed when it is
recorded, so a CUDA graph replays the handshake as it was captured: every forward makes an even
number of calls (two per layer), so each starts at slot 0.

Where a rank's region holds what (`own` is its run of rows, a sender's index counts from the rank
after the receiver): part 0, the peers' partial sums of the receiver's rows, one after another by
sender index; part 1, the peers' normalized rows packed in row order, the receiver's own left out.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def above_bytes_from_env(world: int) -> int:
    """ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES where it is set (tests send tiny models through this path
    with 0), else 16 MiB a rank: 32 MiB at TP=2, 64 MiB at TP=4."""
    value = os.environ.get("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", str(world * 16 * 2**20))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES must be a whole number of bytes, got {value!r}") from None


# Only larger all-reduces take this path. Up to 8 MiB the one-shot push kernel (symm_all_reduce.py)
# beat it in decode graphs (512 rows of 4096: 31.8 against 63.2 us for o_proj with its norm). Above
# that, an eager prefill step pays the host's launches: a layer this way costs the host ~0.9 ms at
# four ranks against ~0.2-0.4 through NCCL (bench/row_parallel_allreduce.py, "layer ce host"), while
# its GPU time per row shrinks with the ranks. So the bound grows with them. At TP=2 on two H200s
# in one call W2 made 18,600 tok/s with NCCL and 15,716 this way in prefill steps of 4096 tokens
# (32 MiB), while in steps of 8192 (64 MiB) this way won, 19,844 and 19,935 against 18,902 and
# 18,914 (benchmarks/results/ce-threshold-h200x2-c85b803.txt). At TP=4 on four H200s (session 19)
# steps of 8192 tokens (64 MiB) made 29,211 this way against 30,942 with NCCL, and steps of 16384
# (128 MiB) 33,460 and 33,535 against 31,255 and 31,209 (benchmarks/results/ce-tp4-h200x4-dd9d926.txt).
# A receive region holds (world - 1) / world of the largest product, and a row per peer more for
# runs of rows that are one longer than an even share (rows of up to 128k features).
_ROW_SLACK = 2**17

_WAIT_VALUE_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_WRITE_VALUE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: a system-wide fence before the write
_EVENT_DISABLE_TIMING = 0x2  # CU_EVENT_DISABLE_TIMING


class _Driver:
    """The CUDA driver calls of an exchange: stream memory operations (torch does not expose the
    wait), the copy itself, and the events that order a copy's stream after the main stream's work
    and back. An eager prefill step makes two exchanges a layer, each with a copy and a flag per
    peer, and at four ranks the host's launches held the GPU up: with the copies made through torch
    (a stream context, wait_stream, views, copy_) W2's 8192-token steps took 118 ms, with the copy
    and flags as driver calls 79 (NCCL 69-70), on two four-H200 machines
    (benchmarks/results/ce-tp4-h200x4-dd9d926.txt). The calls keep the GIL (PyDLL), as each only
    enqueues work: with another Python thread busy, a CDLL call, which drops the GIL and takes it
    back, waited 3-9 ms for it, against 3-7 us (bench/ce_host_calls.py). A worker's only other
    thread mostly sleeps, and W2 did not tell the two apart (tp4-h200x4-session20.txt)."""

    def __init__(self, loader: type[ctypes.CDLL] = ctypes.PyDLL) -> None:
        driver = loader("libcuda.so.1")
        u64, u32, ptr, uint = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint
        self._write = self._function(driver, "cuStreamWriteValue32", [ptr, u64, u32, uint])
        self._wait = self._function(driver, "cuStreamWaitValue32", [ptr, u64, u32, uint])
        self._copy = self._function(driver, "cuMemcpyDtoDAsync", [u64, u64, ctypes.c_size_t, ptr])
        self._event_create = self._function(driver, "cuEventCreate", [ctypes.POINTER(ptr), uint])
        self._record = self._function(driver, "cuEventRecord", [ptr, ptr])
        self._wait_event = self._function(driver, "cuStreamWaitEvent", [ptr, ptr, uint])

    @staticmethod
    def _function(driver: ctypes.CDLL, name: str, argtypes: list):
        fn = getattr(driver, name + "_v2", None) or getattr(driver, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn

    def write(self, stream: int, address: int, value: int) -> None:
        self._check("cuStreamWriteValue32", self._write(stream, address, value, _WRITE_VALUE_DEFAULT))

    def wait(self, stream: int, address: int, value: int) -> None:
        self._check("cuStreamWaitValue32", self._wait(stream, address, value, _WAIT_VALUE_EQ))

    def copy(self, stream: int, dst: int, src: int, nbytes: int) -> None:
        self._check("cuMemcpyDtoDAsync", self._copy(dst, src, nbytes, stream))

    def event(self) -> int:
        """A new event of the current context. It lives as long as the process, as the engine does."""
        handle = ctypes.c_void_p()
        self._check("cuEventCreate", self._event_create(ctypes.byref(handle), _EVENT_DISABLE_TIMING))
        return handle.value

    def record(self, event: int, stream: int) -> None:
        self._check("cuEventRecord", self._record(event, stream))

    def wait_event(self, stream: int, event: int) -> None:
        self._check("cuStreamWaitEvent", self._wait_event(stream, event, 0))

    @staticmethod
    def _check(name: str, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"{name} failed with CUresult {status}")


def row_runs(rows: int, world: int) -> list[tuple[int, int]]:
    """Each rank's run of rows as (lo, hi): rank r owns [r * rows // world, (r + 1) * rows // world)."""
    return [(r * rows // world, (r + 1) * rows // world) for r in range(world)]


def region_numel(max_numel: int, world: int) -> int:
    """Elements of one receive region for products of up to max_numel elements."""
    return max_numel * (world - 1) // world + (world - 1) * _ROW_SLACK


def fits_region(rows: int, features: int, world: int, numel: int) -> bool:
    """Whether a region of numel elements holds both parts of a [rows, features] product: the
    peers' parts of the longest run of rows, and every row but the shortest run."""
    longest, shortest = -(-rows // world), rows // world
    return max((world - 1) * longest, rows - shortest) * features <= numel


def peers_from(rank: int, world: int) -> list[int]:
    """The other ranks, starting after this one: at each turn every rank sends to a different peer."""
    return [(rank + k) % world for k in range(1, world)]


class CopyEngineAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int,
                 above_bytes: int | None = None) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.world = dist.get_world_size(group)
        if self.world < 2:
            raise ValueError("the copy-engine all-reduce is for two ranks or more")
        self.dtype = dtype
        self.above_numel = (above_bytes_from_env(self.world) if above_bytes is None else above_bytes) // dtype.itemsize
        self.region_numel = region_numel(max_bytes // dtype.itemsize, self.world)
        self.rank = dist.get_rank(group)
        self.peers = peers_from(self.rank, self.world)
        self.driver = _Driver()
        # A stream per peer, so that the copies to different peers run on different copy engines,
        # and an event to order each after the main stream's work, and the main stream after it.
        self.streams = {peer: torch.cuda.Stream(device) for peer in self.peers}
        with torch.cuda.device(device):
            self.made = self.driver.event()
            self.sent = {peer: self.driver.event() for peer in self.peers}

        # Per rank two slots, each a region for the scattered partial sums and one for the gathered
        # normalized rows, and a flag per region and sender; all zero before the first call.
        self.receive = symm_mem.empty(4 * self.region_numel, dtype=dtype, device=device)
        receive = symm_mem.rendezvous(self.receive, group)
        self.own_regions = self.receive.view(2, 2, self.region_numel)
        self.peer_region_ptrs = {peer: receive.buffer_ptrs[peer] for peer in self.peers}
        self.flags = symm_mem.empty(4 * self.world, dtype=torch.int32, device=device)
        self.flags.zero_()
        torch.cuda.synchronize(device)
        flags = symm_mem.rendezvous(self.flags, group)
        self.flag_ptrs = [flags.buffer_ptrs[r] for r in range(self.world)]
        self.calls = 0
        dist.barrier(group)  # no peer writes into buffers that are not yet zero

    def _flag(self, owner: int, slot: int, part: int, sender: int) -> int:
        return self.flag_ptrs[owner] + 4 * ((2 * slot + part) * self.world + sender)

    def takes(self, rows: int, features: int, dtype: torch.dtype) -> bool:
        return (dtype == self.dtype and self.above_numel < rows * features and rows >= self.world
                and fits_region(rows, features, self.world, self.region_numel))

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> SplitSum:
        """x W^T for x [rows, in] and weight [out, in] (`takes` must hold), each peer's rows of it sent
        to that peer; the returned SplitSum must be read (all of it) on the same stream before the
        next call."""
        runs = row_runs(x.shape[0], self.world)
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        slot = self.calls % 2
        self.calls += 1
        # torch's current-stream lookup costs the host ~8 us (bench/ce_host_calls.py): once a call.
        main = torch.cuda.current_stream().cuda_stream
        for index, peer in enumerate(self.peers):
            lo, hi = runs[peer]
            torch.matmul(x[lo:hi], weight.t(), out=out[lo:hi])
            # Among the peer's senders, counted from the rank after the peer, this rank is world - 2 - index.
            self.send(main, out[lo:hi], slot, part=0, offsets={peer: (self.world - 2 - index) * out[lo:hi].numel()})
        lo, hi = runs[self.rank]
        torch.matmul(x[lo:hi], weight.t(), out=out[lo:hi])
        return SplitSum(self, slot, out, runs, main)

    def send(self, main: int, rows: torch.Tensor, slot: int, part: int, offsets: dict[int, int]) -> None:
        """Copy rows (contiguous) into each peer's region `part` of `slot` at its offset once the main
        stream has made them, then raise this rank's flag of that region there."""
        self.driver.record(self.made, main)
        start = (2 * slot + part) * self.region_numel
        itemsize = self.dtype.itemsize
        for peer, offset in offsets.items():
            stream = self.streams[peer].cuda_stream
            self.driver.wait_event(stream, self.made)
            destination = self.peer_region_ptrs[peer] + (start + offset) * itemsize
            self.driver.copy(stream, destination, rows.data_ptr(), rows.numel() * itemsize)
            self.driver.write(stream, self._flag(peer, slot, part, self.rank), 1)

    def receive_region(self, main: int, slot: int, part: int) -> torch.Tensor:
        """This rank's region `part` of `slot` (flat), once the main stream waits for every peer's copy."""
        for peer in self.peers:
            self.driver.wait(main, self._flag(self.rank, slot, part, peer), 1)
            self.driver.write(main, self._flag(self.rank, slot, part, peer), 0)
        if part == 1:
            for peer, stream in self.streams.items():  # this rank's copies read its tensors: they must outlive them
                self.driver.record(self.sent[peer], stream.cuda_stream)
                self.driver.wait_event(main, self.sent[peer])
        return self.own_regions[slot, part]


@dataclass
class SplitSum:
    """A row-parallel layer's all-reduce, split by rows between the ranks: this rank's product of
    every row (`mine`), with the peers' parts of this rank's rows to come. The reader takes
    `scattered()`, makes its rows of whatever follows, `share`s them and takes the peers' from
    `gathered`: every call must get all of that, in that order."""

    engine: CopyEngineAllReduce
    slot: int
    mine: torch.Tensor
    runs: list[tuple[int, int]]
    main: int  # the stream the call was made on, which reads it

    @property
    def own(self) -> tuple[int, int]:
        return self.runs[self.engine.rank]

    def scattered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's part of its own rows [n, features], the peers' parts of them [world - 1, n,
        features]): the sum of all of them is the all-reduce there."""
        lo, hi = self.own
        features = self.mine.shape[1]
        region = self.engine.receive_region(self.main, self.slot, 0)
        return self.mine[lo:hi], region[: (self.engine.world - 1) * (hi - lo) * features].view(-1, hi - lo, features)

    def share(self, rows: torch.Tensor) -> None:
        """Send this rank's finished rows (of `own`) to every peer."""
        lo, hi = self.own
        assert rows.dtype == self.engine.dtype and rows.shape[0] == hi - lo
        rows = rows.contiguous()
        offsets = {}
        for peer in self.engine.peers:
            peer_lo, peer_hi = self.runs[peer]
            # The peer's region packs the other ranks' rows in order, its own left out.
            offsets[peer] = (lo if lo < peer_lo else lo - (peer_hi - peer_lo)) * rows.shape[1]
        self.engine.send(self.main, rows, self.slot, part=1, offsets=offsets)

    def gathered(self, features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The peers' finished rows before this rank's own and after them, once the current stream
        waits for them."""
        lo, hi = self.own
        rows = self.runs[-1][1] - (hi - lo)
        packed = self.engine.receive_region(self.main, self.slot, 1)[: rows * features].view(rows, features)
        return packed[:lo], packed[lo:]

    def total(self) -> torch.Tensor:
        """The all-reduce of every row, in place in mine."""
        mine, theirs = self.scattered()
        total = mine.float()
        for part in theirs:  # in the order the fused norm adds them, rounded once as it does
            total += part.float()
        self.share(mine.copy_(total))
        lo, hi = self.own
        before, after = self.gathered(self.mine.shape[1])
        self.mine[:lo].copy_(before)
        self.mine[hi:].copy_(after)
        return self.mine
