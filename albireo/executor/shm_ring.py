"""Step plans from the engine core to its workers: a compact binary encoding and a shared-memory ring.

Under tensor parallelism the engine core hands the same `SchedulerOutput` to every worker process
each step, hundreds of times a second. Two pieces make that cheap:

`encode_plan` / `decode_plan`
    A plan becomes one flat buffer: a fixed header of counts, then int32 arrays. All request ids
    of the plan travel as one UTF-8 blob (joined by NUL when no id contains one, so decoding is a
    single `str.split`; otherwise with an offsets array). A decode-only step is nothing but ids and integers,
    with no pickle. `SamplingParams` of new requests (rare: a request joins or resumes) are
    pickled, all of one plan in one pickle. The trade-off: pickle follows every field of the
    dataclass (stop strings, seed, logprobs, fields added later) without a second schema to keep in
    sync, and its cost (a few microseconds a request) is paid only on the step a request is
    (re)admitted; in return that part of the message is Python-specific and must only ever be read
    by processes of the same trusted engine: never from a socket anyone can write to. (Multi-node
    runs carry these messages over TCP from node 0 to the worker nodes that connected to it; see
    node_relay.py for that trust.)

`ShmRing`
    One writer, N readers, each in its own process, over one `multiprocessing.shared_memory`
    segment holding K fixed-size slots. Every reader receives every message, in order. See the
    class docstring for the layout and the protocol.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
import time
from array import array
from dataclasses import dataclass
from itertools import accumulate, chain, pairwise
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Self

import numpy as np

from albireo.core.scheduler import CachedRequestData, NewRequestData, SchedulerOutput

__all__ = [
    "ShmRing",
    "ShmRingHandle",
    "decode_plan",
    "encode_plan",
    "plan_uses_pickle",
]

# ---------------------------------------------------------------------------------------------------
# Plan encoding
# ---------------------------------------------------------------------------------------------------
#
# Layout (native byte order: both ends run on the same host). Every section starts on a multiple of
# 4 bytes, so each int32 array is aligned.
#
#   header            _PLAN_HEADER: magic, version, flags and the counts below
#   id offsets        only without _F_NUL_SEP: int32[n_ids + 1], byte offset where each id starts in
#                     the blob; the last entry is where an id after the last one would start
#   id blob           utf-8, ids joined by b"\0" (flag _F_NUL_SEP) or simply concatenated (when an id
#                     contains a NUL itself), padded to 4 bytes
#   cached            int32[n_cached] num_computed_tokens, int32[n_cached] number of new block ids
#                     each, int32[n_cached_blocks] the new block ids one request after the other
#   scheduled         int32[n_sched] scheduled token counts, in the plan's (batch) order
#   new requests      only when n_new > 0: _NEW_HEADER (totals and pickle length), int32[n_new]
#                     num_computed_tokens, int32[4 * n_new] lengths of prompt, output, eos and block
#                     ids per request, those four lists concatenated, then the pickled list of
#                     SamplingParams
#   kv transfers      only with flag _F_KV: _KV_HEADER (number of loads, of saves), then
#                     int32[2 * n_loads] (host slot, device block) pairs and int32[2 * n_saves]
#                     (device block, host slot) pairs
#
# The id table lists: cached request ids, new request ids, then the keys of num_scheduled_tokens
# unless they are exactly those two lists in that order (flag _F_SCHED_IMPLIED: what the scheduler
# produces, so usually no id is sent twice), then finished ids in the set's iteration order.

_PLAN_MAGIC = b"ALBP"
_PLAN_VERSION = 2
# magic, version, flags, n_cached, n_new, n_sched, n_finished, n_ids, blob_len, n_cached_blocks
_PLAN_HEADER = struct.Struct("=4sHHIIIIIII")
# totals of prompt, output, eos and block ids of the new requests, then the pickle's length
_NEW_HEADER = struct.Struct("=IIIII")
_KV_HEADER = struct.Struct("=II")

_F_PICKLE = 1  # the message holds a pickle (new requests' SamplingParams)
_F_SCHED_IMPLIED = 2  # scheduled ids == cached ids + new ids: not sent again
_F_NUL_SEP = 4  # the id blob is "\0".join(ids)
_F_KV = 8  # the plan carries KV copies between the device pool and the host tier

# int32 arrays are built with array.array("i") (the bytes of a numpy int32 array, at a fraction of
# the fixed cost per array, which matters for small plans) and read back through memoryview casts.
# Both refuse values outside int32 (OverflowError) instead of wrapping them.
_I32 = "i"
assert array(_I32).itemsize == 4, "C int is not 32 bits on this platform"
_SMALL = 32  # below this many items, plain Python loops beat numpy's fixed cost


def _pad4(n: int) -> int:
    return -n % 4


def _encode_ids(ids: list[str]) -> tuple[int, array | bytes, bytes]:
    """(flags, offsets, blob) of the id table; NUL-separated ids need no offsets."""
    text = "\0".join(ids)
    if text.count("\0") == len(ids) - 1 or not ids:
        return _F_NUL_SEP, b"", text.encode()
    # An id contains a NUL: plain concatenation, cut by the offsets.
    parts = [s.encode() for s in ids]
    return 0, array(_I32, accumulate([len(p) for p in parts], initial=0)), b"".join(parts)


def encode_plan(plan: SchedulerOutput) -> bytes:
    """Encode a plan; `decode_plan` rebuilds it. A plan without new requests contains no pickle."""
    cached = plan.cached_requests
    new = plan.new_requests
    sched = plan.num_scheduled_tokens
    finished = list(plan.finished_req_ids)
    nc, nn, ns, nf = len(cached), len(new), len(sched), len(finished)

    ids = [c.req_id for c in cached]
    if nn:
        ids += [r.req_id for r in new]
    sched_ids = list(sched)
    flags = 0
    if sched_ids == ids:
        flags |= _F_SCHED_IMPLIED
    else:
        ids += sched_ids
    ids += finished
    id_flags, offsets, blob = _encode_ids(ids)
    flags |= id_flags

    block_lists = [c.new_block_ids for c in cached]
    block_counts = array(_I32, [len(b) for b in block_lists])
    blocks = array(_I32, chain.from_iterable(block_lists))
    parts: list = [
        None,  # header, filled in below
        offsets,
        blob,
        b"\0" * _pad4(len(blob)),
        array(_I32, [c.num_computed_tokens for c in cached]),
        block_counts,
        blocks,
        array(_I32, sched.values()),
    ]

    if nn:
        flags |= _F_PICKLE
        groups = (
            [r.prompt_token_ids for r in new],
            [r.output_token_ids for r in new],
            [r.eos_token_ids for r in new],
            [r.block_ids for r in new],
        )
        lens = [[len(x) for x in group] for group in groups]
        params = pickle.dumps([r.sampling_params for r in new], protocol=pickle.HIGHEST_PROTOCOL)
        parts.append(_NEW_HEADER.pack(*map(sum, lens), len(params)))
        parts.append(array(_I32, [r.num_computed_tokens for r in new]))
        parts.append(array(_I32, chain.from_iterable(lens)))
        for group in groups:
            parts.append(array(_I32, chain.from_iterable(group)))
        parts.append(params)

    if plan.kv_loads or plan.kv_saves:
        flags |= _F_KV
        parts.append(_KV_HEADER.pack(len(plan.kv_loads), len(plan.kv_saves)))
        parts.append(array(_I32, chain.from_iterable(plan.kv_loads)))
        parts.append(array(_I32, chain.from_iterable(plan.kv_saves)))

    parts[0] = _PLAN_HEADER.pack(_PLAN_MAGIC, _PLAN_VERSION, flags, nc, nn, ns, nf, len(ids), len(blob), len(blocks))
    return b"".join(parts)


def plan_uses_pickle(buf) -> bool:
    """Whether an encoded plan carries a pickle (only plans with new requests do)."""
    magic, _version, flags = _PLAN_HEADER.unpack_from(buf, 0)[:3]
    if magic != _PLAN_MAGIC:
        raise ValueError("not an encoded plan")
    return bool(flags & _F_PICKLE)


def _split(flat: list[int], lens: list[int]) -> list[list[int]]:
    """Cut `flat` into consecutive lists of the given lengths (each a new list)."""
    ends = list(accumulate(lens))
    return [flat[e - k : e] for e, k in zip(ends, lens)]


def _split_sparse(flat: list[int], counts: list[int], counts_buf: memoryview) -> list[list[int]]:
    """As _split, for counts that are mostly 0 (new block ids of decodes: one in block_size steps)."""
    n = len(counts)
    if not flat:
        return [[] for _ in range(n)]
    if n <= _SMALL:
        return _split(flat, counts)
    out: list[list[int]] = [[] for _ in range(n)]
    arr = np.frombuffer(counts_buf, dtype=np.int32)
    rows = np.flatnonzero(arr)
    ends = np.cumsum(arr)[rows]
    for row, end, k in zip(rows.tolist(), ends.tolist(), arr[rows].tolist()):
        out[row] = flat[end - k : end]
    return out


def decode_plan(buf) -> SchedulerOutput:
    """Rebuild the plan `encode_plan` encoded. Holds no reference into `buf` afterwards.

    num_scheduled_tokens keeps its order (the batch order). finished_req_ids is rebuilt by adding
    the ids in the order the sender's set yielded them, as pickle does: a set's iteration order
    also depends on the hash seed of the process, so it cannot be reproduced in another process by
    any encoding, and code that needs a fixed order must sort.
    """
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    try:
        return _decode(mv)
    finally:
        mv.release()


def _decode(mv: memoryview) -> SchedulerOutput:
    if mv.nbytes < _PLAN_HEADER.size:
        raise ValueError("encoded plan is truncated")
    magic, version, flags, nc, nn, ns, nf, n_ids, blob_len, n_blocks = _PLAN_HEADER.unpack_from(mv, 0)
    if magic != _PLAN_MAGIC or version != _PLAN_VERSION:
        raise ValueError(f"not an encoded plan of version {_PLAN_VERSION}: {bytes(magic)!r} v{version}")
    pos = _PLAN_HEADER.size + (0 if flags & _F_NUL_SEP else 4 * (n_ids + 1))  # after the offsets
    if mv.nbytes < pos + blob_len + 4 * (2 * nc + n_blocks + ns):
        raise ValueError("encoded plan is truncated")
    if n_ids == 0:
        ids: list[str] = []
    elif flags & _F_NUL_SEP:
        ids = str(mv[pos : pos + blob_len], "utf-8").split("\0")
    else:
        bounds = mv[_PLAN_HEADER.size : pos].cast(_I32).tolist()
        blob = mv[pos : pos + blob_len]
        ids = [str(blob[a:b], "utf-8") for a, b in pairwise(bounds)]
    if len(ids) != n_ids:
        raise ValueError("encoded plan is corrupt: id count mismatch")
    pos += blob_len + _pad4(blob_len)

    cached_ids = ids[:nc]
    new_ids = ids[nc : nc + nn]
    if flags & _F_SCHED_IMPLIED:
        sched_ids = ids[: nc + nn]
        fin_start = nc + nn
    else:
        sched_ids = ids[nc + nn : nc + nn + ns]
        fin_start = nc + nn + ns
    finished = set(ids[fin_start : fin_start + nf])

    # num_computed_tokens, block counts, block ids and scheduled counts: one int32 run.
    end = pos + 4 * (2 * nc + n_blocks + ns)
    ints = mv[pos:end].cast(_I32).tolist()
    a, b, c = nc, 2 * nc, 2 * nc + n_blocks
    new_blocks = _split_sparse(ints[b:c], ints[a:b], mv[pos + 4 * a : pos + 4 * b])
    cached = list(map(CachedRequestData, cached_ids, new_blocks, ints[:a]))
    num_scheduled = dict(zip(sched_ids, ints[c:]))
    pos = end

    new: list[NewRequestData] = []
    if nn:

        def view(n: int) -> memoryview:
            nonlocal pos
            out = mv[pos : pos + 4 * n].cast(_I32)
            pos += 4 * n
            return out

        totals = _NEW_HEADER.unpack_from(mv, pos)
        pos += _NEW_HEADER.size
        new_computed = view(nn).tolist()
        lens = view(4 * nn).tolist()
        groups = [_split(view(total).tolist(), lens[g * nn : (g + 1) * nn]) for g, total in enumerate(totals[:4])]
        pickle_len = totals[4]
        params = pickle.loads(mv[pos : pos + pickle_len])
        pos += pickle_len
        prompts, outputs, eos, blocks = groups
        new = [
            NewRequestData(
                req_id=new_ids[i],
                prompt_token_ids=prompts[i],
                output_token_ids=outputs[i],
                sampling_params=params[i],
                eos_token_ids=eos[i],
                block_ids=blocks[i],
                num_computed_tokens=new_computed[i],
            )
            for i in range(nn)
        ]
    loads: list[tuple[int, int]] = []
    saves: list[tuple[int, int]] = []
    if flags & _F_KV:
        n_loads, n_saves = _KV_HEADER.unpack_from(mv, pos)
        pos += _KV_HEADER.size
        pairs = mv[pos : pos + 8 * (n_loads + n_saves)].cast(_I32).tolist()
        pos += 8 * (n_loads + n_saves)
        loads = list(zip(pairs[0 : 2 * n_loads : 2], pairs[1 : 2 * n_loads : 2]))
        saves = list(zip(pairs[2 * n_loads :: 2], pairs[2 * n_loads + 1 :: 2]))
    if pos != mv.nbytes:
        raise ValueError(f"encoded plan is corrupt: {mv.nbytes - pos} bytes left over")
    return SchedulerOutput(new, cached, num_scheduled, finished, loads, saves)


# ---------------------------------------------------------------------------------------------------
# Shared-memory ring
# ---------------------------------------------------------------------------------------------------

_RING_MAGIC = 0x414C4252  # "ALBR"
_RING_VERSION = 1
# magic, version, num_readers, num_slots, slot_bytes, writer pid
_RING_HEADER = struct.Struct("=IIIIQQ")
_CLOSED_OFF = _RING_HEADER.size  # one byte: set by the writer when it closes
_META_OFF = 64
_SLOT_META = 24  # seq, length, kind: three uint64; then one read flag byte per reader
_INLINE, _OVERFLOW = 0, 1
_MIN_SLOT_BYTES = 256  # an overflow slot holds a segment name

# Waiting: poll, yielding the CPU between polls, for `spin_s`; then sleep, doubling the sleep from
# _MIN_SLEEP up to _MAX_SLEEP. A reader looks whether the writer process still exists every
# _ALIVE_CHECK_S while it sleeps.
_DEFAULT_SPIN_S = 1e-3
_MIN_SLEEP = 20e-6
_MAX_SLEEP = 1e-3
_ALIVE_CHECK_S = 0.1

_fence_lock = threading.Lock()


def _fence() -> None:
    """Order this process's shared-memory accesses before and after the call.

    Python exposes no memory fence. On x86-64 stores are not reordered with stores nor loads with
    loads, and the interpreter (opaque C calls between a payload copy and a flag store) keeps the
    compiler from reordering them. For weakly ordered CPUs (ARM) the closest thing Python offers
    is a lock round trip, whose atomic instructions carry acquire/release ordering and act as a
    barrier in practice; vLLM's shared-memory broadcast relies on the same trick. It costs about
    0.1 us.
    """
    _fence_lock.acquire()
    _fence_lock.release()


_attach_lock = threading.Lock()


def _attach_untracked(name: str) -> SharedMemory:
    """Open an existing segment without registering it with this process's resource tracker.

    Python < 3.13 registers every segment it opens, and the tracker unlinks (and warns about)
    whatever is still registered when its processes end: a reader started on its own (torchrun,
    subprocess: its own tracker) would destroy the writer's segment when it exits. Unregistering
    right after attaching is wrong the other way: a reader started by multiprocessing (fork or
    spawn) shares its parent's tracker, so it would cancel the writer's own registration, and the
    writer's unlink() would then make the tracker print a KeyError. So the registration is skipped:
    with track=False where Python has it, else by stubbing the tracker's register() for the
    duration of the call.
    """
    try:
        return SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        pass
    with _attach_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = register


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ShmRingHandle:
    """What a reader process needs to attach: picklable and small."""

    name: str
    num_readers: int
    num_slots: int
    slot_bytes: int


class ShmRing:
    """Single-producer, multi-consumer broadcast ring in shared memory.

    Layout of the segment::

        [0, 64)           header: magic, version, num_readers, num_slots, slot_bytes, writer pid,
                          then the "closed" byte
        [64, data_off)    per slot, on its own 64-byte lines: seq (u64), length (u64), kind (u64:
                          inline or overflow), one read flag byte per reader
        [data_off, end)   num_slots slots of slot_bytes

    Message m (1, 2, ...) goes to slot (m - 1) % num_slots. The writer waits until every reader's
    flag of that slot is set (all flags start set), copies the payload, writes length and kind,
    clears the flags, then, after a fence, publishes seq = m. A reader waiting for message m polls
    the slot's seq until it equals m, reads length and payload, then, after a fence, sets its own
    flag. Each flag has a single writer at a time (the writer only clears flags of a slot once all
    are set and before publishing; a reader only sets its own flag after seeing its message), so no
    lock is shared between processes.

    A message larger than a slot goes through an overflow segment: the writer creates a temporary
    SharedMemory of the message's size, and the slot carries its name. The writer unlinks it when
    the slot is reused (every reader has copied it out) or at `unlink()`. A reader copies an
    overflow message out, so `get()` always returns bytes that stay valid.

    Readers attach with `ShmRing.attach(writer.handle(), reader_index)`, one distinct index per
    reader process, before or after messages are sent: each reader receives every message from the
    first one (the writer blocks once all slots are full until every reader has attached and
    read). The writer's `close()` sets the closed flag: readers drain what is pending, then `get()`
    raises EOFError. A reader also raises EOFError when the writer process no longer exists (a
    crash), checked with kill(pid, 0) while it sleeps; that check is off when the writer's pid was
    not visible at attach (another pid namespace). `put()` and `get()` block, polling with backoff,
    and raise TimeoutError after `timeout` seconds when given one.
    """

    def __init__(
        self,
        shm: SharedMemory,
        num_readers: int,
        num_slots: int,
        slot_bytes: int,
        reader_index: int | None,
        spin_s: float,
    ) -> None:
        self._shm = shm
        self.num_readers = num_readers
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.reader_index = reader_index
        self.is_writer = reader_index is None
        self.spin_s = spin_s
        stride = self._meta_stride(num_readers)
        data_off = self._data_offset(num_readers, num_slots)
        buf = shm.buf
        self._b = buf
        self._q = buf[:data_off].cast("Q")
        metas = [_META_OFF + s * stride for s in range(num_slots)]
        self._seq_idx = [m // 8 for m in metas]
        self._flag_off = [m + _SLOT_META for m in metas]
        self._data = [buf[data_off + s * slot_bytes : data_off + (s + 1) * slot_bytes] for s in range(num_slots)]
        self._ones = b"\1" * num_readers
        self._zeros = b"\0" * num_readers
        self._next = 1  # the next message to put (writer) or get (reader)
        self._closed = False
        self._overflow: list[SharedMemory | None] = [None] * num_slots
        self.writer_pid = _RING_HEADER.unpack_from(buf, 0)[5]
        self._watch_writer = not self.is_writer and _pid_alive(self.writer_pid)

    # ---- geometry ---------------------------------------------------------------------------

    @staticmethod
    def _meta_stride(num_readers: int) -> int:
        return -(-(_SLOT_META + num_readers) // 64) * 64

    @classmethod
    def _data_offset(cls, num_readers: int, num_slots: int) -> int:
        return _META_OFF + num_slots * cls._meta_stride(num_readers)

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls, num_readers: int, num_slots: int = 8, slot_bytes: int = 4 << 20, spin_s: float = _DEFAULT_SPIN_S
    ) -> ShmRing:
        """The writer's end: a new segment for `num_readers` readers."""
        if num_readers < 1:
            raise ValueError(f"num_readers must be >= 1, got {num_readers}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if slot_bytes < _MIN_SLOT_BYTES:
            raise ValueError(f"slot_bytes must be >= {_MIN_SLOT_BYTES}, got {slot_bytes}")
        size = cls._data_offset(num_readers, num_slots) + num_slots * slot_bytes
        shm = SharedMemory(create=True, size=size)
        buf = shm.buf
        buf[: cls._data_offset(num_readers, num_slots)] = bytes(cls._data_offset(num_readers, num_slots))
        _RING_HEADER.pack_into(buf, 0, _RING_MAGIC, _RING_VERSION, num_readers, num_slots, slot_bytes, os.getpid())
        stride = cls._meta_stride(num_readers)
        for s in range(num_slots):
            off = _META_OFF + s * stride + _SLOT_META
            buf[off : off + num_readers] = b"\1" * num_readers  # free: "read by everyone"
        return cls(shm, num_readers, num_slots, slot_bytes, None, spin_s)

    def handle(self) -> ShmRingHandle:
        return ShmRingHandle(self._shm.name, self.num_readers, self.num_slots, self.slot_bytes)

    @classmethod
    def attach(cls, handle: ShmRingHandle, reader_index: int, spin_s: float = _DEFAULT_SPIN_S) -> ShmRing:
        """A reader's end, in any process. Each reader process takes its own index."""
        if not 0 <= reader_index < handle.num_readers:
            raise ValueError(f"reader_index must be in [0, {handle.num_readers}), got {reader_index}")
        shm = _attach_untracked(handle.name)
        magic, version, num_readers, num_slots, slot_bytes, _ = _RING_HEADER.unpack_from(shm.buf, 0)
        if (magic, version) != (_RING_MAGIC, _RING_VERSION) or (num_readers, num_slots, slot_bytes) != (
            handle.num_readers,
            handle.num_slots,
            handle.slot_bytes,
        ):
            shm.close()
            raise ValueError(f"shared memory {handle.name!r} is not the ring {handle}")
        return cls(shm, num_readers, num_slots, slot_bytes, reader_index, spin_s)

    # ---- writer -------------------------------------------------------------------------------

    def _slot_free(self, s: int) -> bool:
        off = self._flag_off[s]
        return self._b[off : off + self.num_readers] == self._ones

    def _wait(self, ready, timeout: float | None, what: str, check_writer: bool = False) -> None:
        """Poll `ready()` until true; spin (yielding) first, then sleep with exponential backoff."""
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_end = now + self.spin_s
        next_alive_check = now + _ALIVE_CHECK_S
        delay = _MIN_SLEEP
        while True:
            if ready():
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"{what}: nothing after {timeout} s")
            if now < spin_end:
                os.sched_yield()
                continue
            if check_writer and now >= next_alive_check:
                next_alive_check = now + _ALIVE_CHECK_S
                if not _pid_alive(self.writer_pid):
                    if ready():
                        return
                    raise EOFError(f"the ring's writer (pid {self.writer_pid}) is gone")
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - now)))
            delay = min(delay * 2, _MAX_SLEEP)

    def put(self, payload, timeout: float | None = None) -> None:
        """Send `payload` to every reader; blocks while its slot still holds an unread message."""
        if not self.is_writer:
            raise RuntimeError("put() on a reader's end of the ring")
        if self._closed:
            raise ValueError("put() on a closed ring")
        mv = memoryview(payload)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        m = self._next
        s = (m - 1) % self.num_slots
        if not self._slot_free(s):
            self._wait(lambda: self._slot_free(s), timeout, f"put() of message {m}")
        _fence()  # the readers' reads of this slot are done before it is overwritten
        old = self._overflow[s]
        if old is not None:
            self._overflow[s] = None
            old.unlink()
        data = self._data[s]
        if n <= self.slot_bytes:
            data[:n] = mv
            kind = _INLINE
        else:
            seg = SharedMemory(create=True, size=n)
            try:
                seg.buf[:n] = mv
            finally:
                seg.close()  # the name is enough to unlink it later
            self._overflow[s] = seg
            name = seg.name.encode()
            data[: len(name)] = name
            kind = _OVERFLOW | (len(name) << 8)
        q = self._q
        si = self._seq_idx[s]
        q[si + 1] = n
        q[si + 2] = kind
        off = self._flag_off[s]
        self._b[off : off + self.num_readers] = self._zeros
        _fence()  # payload, length and cleared flags before the sequence number
        q[si] = m
        self._next = m + 1

    def put_plan(self, plan: SchedulerOutput, timeout: float | None = None) -> None:
        self.put(encode_plan(plan), timeout)

    def wait_drained(self, timeout: float | None = None) -> None:
        """Block until every reader has consumed every message put so far."""
        if self._next == 1:
            return
        s = (self._next - 2) % self.num_slots
        if not self._slot_free(s):
            self._wait(lambda: self._slot_free(s), timeout, "wait_drained()")

    # ---- reader -------------------------------------------------------------------------------

    def _wait_message(self, timeout: float | None) -> int:
        """Wait for the next message; returns its slot. EOFError once closed and drained."""
        if self.is_writer:
            raise RuntimeError("get() on the writer's end of the ring")
        if self._closed:
            raise ValueError("get() on a closed ring")
        m = self._next
        s = (m - 1) % self.num_slots
        si = self._seq_idx[s]
        q = self._q
        if q[si] != m:
            b = self._b

            def ready() -> bool:
                if q[si] == m:
                    return True
                if b[_CLOSED_OFF]:
                    if q[si] == m:  # published just before the close
                        return True
                    raise EOFError("the ring's writer closed it")
                return False

            self._wait(ready, timeout, f"get() of message {m}", check_writer=self._watch_writer)
        _fence()  # the sequence number before the payload
        return s

    def _read_raw(self, s: int):
        """(inline memoryview of the payload, or bytes copied out of its overflow segment)."""
        si = self._seq_idx[s]
        n = self._q[si + 1]
        kind = self._q[si + 2]
        if kind & 0xFF == _INLINE:
            return self._data[s][:n]
        name = str(self._data[s][: kind >> 8], "ascii")
        try:
            seg = _attach_untracked(name)
        except FileNotFoundError:
            raise EOFError(f"overflow segment {name!r} is gone: the writer unlinked the ring") from None
        try:
            return bytes(seg.buf[:n])
        finally:
            seg.close()

    def _mark_read(self, s: int) -> None:
        _fence()  # the payload reads before the flag that lets the writer reuse the slot
        self._b[self._flag_off[s] + self.reader_index] = 1
        self._next += 1

    def get(self, timeout: float | None = None) -> bytes:
        """The next message (a copy). TimeoutError after `timeout` s; EOFError once closed and drained."""
        s = self._wait_message(timeout)
        raw = self._read_raw(s)
        out = raw if isinstance(raw, bytes) else raw.tobytes()
        self._mark_read(s)
        return out

    def get_plan(self, timeout: float | None = None) -> SchedulerOutput:
        """The next message decoded as a plan, straight from shared memory (no intermediate copy)."""
        s = self._wait_message(timeout)
        raw = self._read_raw(s)
        try:
            plan = decode_plan(raw)
        finally:
            if isinstance(raw, memoryview):
                raw.release()
        self._mark_read(s)
        return plan

    # ---- shutdown -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Detach. The writer first sets the closed flag, so readers stop after draining."""
        if self._closed:
            return
        self._closed = True
        # A forked child holding a copy of the writer's object must not close the ring for everyone.
        if self.is_writer and self._b is not None and os.getpid() == self.writer_pid:
            _fence()
            self._b[_CLOSED_OFF] = 1
        for view in (self._q, *self._data):
            view.release()
        self._q = None
        self._data = []
        self._b = None
        try:
            self._shm.close()
        except BufferError:
            pass  # a caller still holds a view into the segment: unmapped when that view dies

    def unlink(self) -> None:
        """Writer only: destroy the segment and any overflow segment still around.

        Readers already attached keep their mapping and can drain inline messages; an unread
        overflow message is lost (its reader gets EOFError).
        """
        if not self.is_writer:
            raise RuntimeError("only the writer unlinks the ring")
        self.close()
        for i, seg in enumerate(self._overflow):
            if seg is not None:
                self._overflow[i] = None
                seg.unlink()
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass

    def __del__(self) -> None:
        # Unmap (and, for the writer, tell the readers) if the owner forgot to; never unlink here:
        # the resource tracker reports a writer's segment that was never unlinked at exit.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self.is_writer:
            self.unlink()
        else:
            self.close()

    def __repr__(self) -> str:
        who = "writer" if self.is_writer else f"reader {self.reader_index}"
        return (
            f"ShmRing({self._shm.name!r}, {who}, readers={self.num_readers}, slots={self.num_slots}, "
            f"slot_bytes={self.slot_bytes}, next={self._next}{', closed' if self._closed else ''})"
        )
