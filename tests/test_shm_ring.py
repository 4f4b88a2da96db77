"""Step plans as compact bytes, and the shared-memory ring that carries them to worker processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest

from albireo.core.scheduler import CachedRequestData, NewRequestData, SchedulerOutput
from albireo.executor import shm_ring
from albireo.executor.shm_ring import ShmRing, ShmRingHandle, decode_plan, encode_plan, plan_uses_pickle
from albireo.sampling_params import SamplingParams

# Readers run in forked processes: a spawned one would import torch again (seconds each).
CTX = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def decode_plan_batch(n: int, block_every: int = 16, id_fmt: str = "{}") -> SchedulerOutput:
    """n running decodes: one token each, a new block for one request in `block_every`."""
    cached = [
        CachedRequestData(id_fmt.format(i), [i % 100] if i % block_every == 0 else [], i % 100 + 1) for i in range(n)
    ]
    return SchedulerOutput([], cached, {c.req_id: 1 for c in cached}, set())


def new_request(req_id: str, params: SamplingParams, prompt_len: int = 5, computed: int = 0) -> NewRequestData:
    return NewRequestData(
        req_id=req_id,
        prompt_token_ids=list(range(100, 100 + prompt_len)),
        output_token_ids=[],
        sampling_params=params,
        eos_token_ids=[2],
        block_ids=list(range(prompt_len // 4 + 1)),
        num_computed_tokens=computed,
    )


def roundtrip(plan: SchedulerOutput) -> SchedulerOutput:
    out = decode_plan(encode_plan(plan))
    assert out == plan
    assert list(out.num_scheduled_tokens) == list(plan.num_scheduled_tokens)
    return out


# ---- encoding ----------------------------------------------------------------------------------


def test_empty_plan_round_trips():
    plan = SchedulerOutput([], [], {}, set())
    out = roundtrip(plan)
    assert out.is_empty and out.finished_req_ids == set()


def test_decode_only_plan_of_512_round_trips_in_batch_order():
    plan = decode_plan_batch(512, id_fmt="cmpl-{}-0")
    # Batch order is not sorted order: reverse the running list.
    plan.cached_requests.reverse()
    plan.num_scheduled_tokens = {c.req_id: 1 for c in plan.cached_requests}
    out = roundtrip(plan)
    assert [c.req_id for c in out.cached_requests] == [c.req_id for c in plan.cached_requests]
    assert sum(len(c.new_block_ids) for c in out.cached_requests) == 32


def test_decode_only_plan_contains_no_pickle(monkeypatch):
    plan = decode_plan_batch(512)
    data = encode_plan(plan)
    assert not plan_uses_pickle(data)
    assert b"\x80\x04" not in data and b"\x80\x05" not in data

    class NoPickle:
        def __getattr__(self, name):
            raise AssertionError(f"pickle.{name} used for a decode-only plan")

    monkeypatch.setattr(shm_ring, "pickle", NoPickle())
    assert decode_plan(encode_plan(plan)) == plan


def test_new_requests_carry_their_sampling_params():
    params = [
        SamplingParams(temperature=0.7, top_p=0.9, stop=["\n\n", "END", "ü"], seed=1234, logprobs=5, max_tokens=64),
        SamplingParams(temperature=0.0, stop_token_ids=[7, 9], min_tokens=2, ignore_eos=True, max_tokens=None),
        SamplingParams(top_k=40, repetition_penalty=1.1, presence_penalty=-0.5, include_stop_str_in_output=True),
    ]
    new = [new_request(f"user-{i}", p, prompt_len=3 + 7 * i, computed=4 * i) for i, p in enumerate(params)]
    new[1].output_token_ids = [11, 12]
    plan = SchedulerOutput(new, [], {r.req_id: len(r.prompt_token_ids) for r in new}, set())
    data = encode_plan(plan)
    assert plan_uses_pickle(data)
    out = roundtrip(plan)
    assert [r.sampling_params for r in out.new_requests] == params
    assert out.new_requests[0].sampling_params.stop == ["\n\n", "END", "ü"]
    assert out.new_requests[0].sampling_params.seed == 1234
    assert out.new_requests[0].sampling_params.logprobs == 5


def test_finished_preempted_and_resumed_requests_round_trip():
    # "17" was preempted earlier and resumes with what it already produced; "17#2" and a user id
    # finished; "5" was preempted in this very step.
    resumed = new_request("17", SamplingParams(seed=3), prompt_len=9)
    resumed.output_token_ids = [40, 41, 42]
    cached = [CachedRequestData("3", [], 30), CachedRequestData("4", [8], 32)]
    sched = {"3": 1, "4": 1, "17": 12}
    finished = {"17#2", "5", "my request: ☃"}
    plan = SchedulerOutput([resumed], cached, sched, finished)
    out = roundtrip(plan)
    assert out.finished_req_ids == finished
    # Rebuilt by adding ids in the sender's iteration order, exactly as pickle rebuilds a set.
    assert list(out.finished_req_ids) == list(pickle.loads(pickle.dumps(plan)).finished_req_ids)
    assert out.new_requests[0].output_token_ids == [40, 41, 42]


def test_scheduled_order_that_is_not_cached_then_new_is_kept():
    new = [new_request("n1", SamplingParams())]
    cached = [CachedRequestData("c1", [], 3), CachedRequestData("c2", [], 4)]
    sched = {"n1": 5, "c2": 1, "c1": 1}
    assert list(roundtrip(SchedulerOutput(new, cached, sched, {"old"})).num_scheduled_tokens) == ["n1", "c2", "c1"]


def test_ids_with_nul_and_non_ascii_characters_round_trip():
    ids = ["a\x00b", "日本語", "", "x" * 300, "\x00"]
    cached = [CachedRequestData(i, [1, 2], 7) for i in ids]
    roundtrip(SchedulerOutput([], cached, dict.fromkeys(ids, 1), {"\x00done", "é"}))


def test_values_outside_int32_are_refused():
    plan = SchedulerOutput([], [CachedRequestData("a", [], 2**31)], {"a": 1}, set())
    with pytest.raises(OverflowError):
        encode_plan(plan)


def test_garbage_is_refused():
    data = encode_plan(decode_plan_batch(4))
    with pytest.raises(ValueError):
        decode_plan(b"not a plan at all, not at all" * 2)
    with pytest.raises(ValueError):
        decode_plan(data[:-4])
    with pytest.raises(ValueError):
        decode_plan(data + b"\0\0\0\0")


# ---- ring --------------------------------------------------------------------------------------


@pytest.fixture
def make_ring():
    rings = []

    def make(*args, **kwargs) -> ShmRing:
        ring = ShmRing.create(*args, **kwargs)
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        ring.unlink()


def _read_plans(handle: ShmRingHandle, index: int, conn) -> None:
    ring = ShmRing.attach(handle, index)
    plans = []
    try:
        while True:
            plans.append(ring.get_plan(timeout=10))
    except EOFError:
        pass
    conn.send(plans)
    ring.close()


def test_two_reader_processes_receive_every_plan_in_order(make_ring):
    ring = make_ring(num_readers=2, num_slots=4, slot_bytes=64 << 10)
    handle = pickle.loads(pickle.dumps(ring.handle()))
    plans = [decode_plan_batch(1 + i % 9, block_every=3, id_fmt=f"s{i}-{{}}") for i in range(40)]
    plans[7].new_requests.append(new_request("joiner", SamplingParams(seed=7)))
    plans[7].num_scheduled_tokens["joiner"] = 5
    pipes, procs = [], []
    for index in range(2):
        recv, send = CTX.Pipe(duplex=False)
        proc = CTX.Process(target=_read_plans, args=(handle, index, send))
        proc.start()
        pipes.append(recv)
        procs.append(proc)
    for plan in plans:
        ring.put_plan(plan, timeout=10)
    ring.close()
    for recv, proc in zip(pipes, procs):
        assert recv.poll(20)
        got = recv.recv()
        proc.join(10)
        assert proc.exitcode == 0
        assert got == plans
        assert [list(p.num_scheduled_tokens) for p in got] == [list(p.num_scheduled_tokens) for p in plans]


def test_writer_waits_for_the_slowest_reader(make_ring):
    ring = make_ring(num_readers=2, num_slots=2, slot_bytes=1024)
    fast, slow = (ShmRing.attach(ring.handle(), i) for i in range(2))
    ring.put(b"m1")
    ring.put(b"m2")
    assert fast.get() == b"m1" and fast.get() == b"m2"
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        ring.put(b"m3", timeout=0.05)  # slot 0 still holds m1 for the slow reader
    assert time.monotonic() - start >= 0.05
    with pytest.raises(TimeoutError):
        ring.wait_drained(timeout=0.01)
    assert slow.get() == b"m1"
    ring.put(b"m3", timeout=1)
    assert slow.get() == b"m2" and slow.get() == b"m3" and fast.get() == b"m3"
    ring.wait_drained(timeout=1)
    fast.close()
    slow.close()


def test_message_larger_than_a_slot_goes_through_an_overflow_segment(make_ring):
    ring = make_ring(num_readers=1, num_slots=2, slot_bytes=1024)
    reader = ShmRing.attach(ring.handle(), 0)
    big = os.urandom(3 << 20)
    ring.put(big)
    overflow_name = ring._overflow[0].name
    assert os.path.exists(f"/dev/shm/{overflow_name}") or sys.platform != "linux"
    assert reader.get() == big
    big_plan = decode_plan_batch(512)
    assert len(encode_plan(big_plan)) > 1024
    ring.put_plan(big_plan)
    assert reader.get_plan() == big_plan
    ring.put(b"small")  # reuses slot 0: its overflow segment is unlinked
    assert reader.get() == b"small"
    assert not os.path.exists(f"/dev/shm/{overflow_name}")
    reader.close()


def _wait_for_eof(handle: ShmRingHandle, conn) -> None:
    ring = ShmRing.attach(handle, 0)
    got = []
    try:
        while True:
            got.append(ring.get(timeout=10))
    except EOFError:
        conn.send(got)
    except TimeoutError:
        conn.send("timeout")
    ring.close()


def test_reader_gets_eof_once_the_writer_closed_and_it_drained(make_ring):
    ring = make_ring(num_readers=1, num_slots=4, slot_bytes=1024)
    recv, send = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_wait_for_eof, args=(ring.handle(), send))
    proc.start()
    ring.put(b"one")
    ring.put(b"two")
    time.sleep(0.05)  # the reader is now blocked in get()
    ring.close()
    assert recv.poll(10)
    assert recv.recv() == [b"one", b"two"]
    proc.join(10)
    assert proc.exitcode == 0


def _create_and_vanish(conn) -> None:
    ring = ShmRing.create(num_readers=1, num_slots=2, slot_bytes=1024)
    ring.put(b"last words")
    conn.send(ring.handle())
    conn.recv()
    os._exit(0)  # no close(): a crash


def test_reader_gets_eof_when_the_writer_process_is_gone():
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_create_and_vanish, args=(child,))
    proc.start()
    handle = parent.recv()
    reader = ShmRing.attach(handle, 0)
    try:
        parent.send("exit")
        proc.join(10)
        assert reader.get(timeout=5) == b"last words"
        start = time.monotonic()
        with pytest.raises(EOFError):
            reader.get(timeout=5)
        assert time.monotonic() - start < 2
    finally:
        reader.close()
        # The child registered the segment with the tracker it shares with this process.
        from multiprocessing.shared_memory import SharedMemory

        SharedMemory(handle.name).unlink()


def test_get_times_out_when_nothing_comes(make_ring):
    ring = make_ring(num_readers=1, num_slots=2, slot_bytes=1024)
    reader = ShmRing.attach(ring.handle(), 0)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.get(timeout=0.05)
    assert 0.05 <= time.monotonic() - start < 1
    ring.put(b"late")
    assert reader.get(timeout=1) == b"late"
    reader.close()


def test_attach_checks_the_reader_index(make_ring):
    ring = make_ring(num_readers=2, num_slots=2, slot_bytes=1024)
    with pytest.raises(ValueError):
        ShmRing.attach(ring.handle(), 2)


_TRACKER_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, os, subprocess, sys
    from albireo.executor.shm_ring import ShmRing, ShmRingHandle

    def read(handle, index):
        ring = ShmRing.attach(handle, index)
        assert ring.get(timeout=30) == b"hello"
        ring.close()

    if __name__ == "__main__" and sys.argv[1:]:  # a reader started on its own, with its own tracker
        read(ShmRingHandle(sys.argv[1], 2, 2, 1 << 10), int(sys.argv[2]))
    elif __name__ == "__main__":
        ring = ShmRing.create(num_readers=2, num_slots=2, slot_bytes=1 << 10)
        ring.put(b"hello")
        forked = mp.get_context("fork").Process(target=read, args=(ring.handle(), 0))
        forked.start()
        alone = subprocess.Popen([sys.executable, __file__, ring.handle().name, "1"])
        forked.join(60)
        assert forked.exitcode == 0 and alone.wait(60) == 0
        path = "/dev/shm/" + ring.handle().name
        assert os.path.exists(path), "a reader's exit destroyed the segment"
        ring.put(b"x" * 5000)  # an overflow segment, left for unlink() to clean up
        ring.unlink()
        assert not os.path.exists(path)
        print("ok")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="fork and /dev/shm")
def test_forked_and_independent_readers_leave_no_tracker_warnings(tmp_path):
    script = tmp_path / "ring_tracker.py"
    script.write_text(_TRACKER_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "resource_tracker" not in result.stderr and "leaked" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_kv_loads_and_saves_round_trip_without_pickle():
    cached = [CachedRequestData("3", [9], 30)]
    plan = SchedulerOutput([], cached, {"3": 1}, set(), kv_loads=[(0, 7), (1, 8), (5, 2)], kv_saves=[(4, 6)])
    assert not plan_uses_pickle(encode_plan(plan))
    out = roundtrip(plan)
    assert out.kv_loads == [(0, 7), (1, 8), (5, 2)] and out.kv_saves == [(4, 6)]
    assert roundtrip(SchedulerOutput([], [], {}, set(), kv_saves=[(1, 2)])).kv_saves == [(1, 2)]
