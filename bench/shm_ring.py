"""Per-step cost of handing a plan to worker processes: shared-memory ring vs pickle over a Pipe.

One step: the writer encodes the plan and puts it in the ring (or pickles it and sends it down one
multiprocessing.Pipe per reader); every reader process receives and decodes it. The writer waits
until all readers are done before the next step, so steps do not overlap. Reported per step:

  e2e     from the writer starting to encode until the last reader finished decoding (readers
          stamp time.perf_counter_ns(), a clock shared by the processes of one host)
  writer  the writer's own part: encode + put, or dumps + send to each reader

Plans are what the scheduler emits for n running decodes: one cached request entry and one
scheduled token each, a new block for one request in 16 per step. A second table times the codec
alone in one process: encode_plan / decode_plan vs pickle.dumps / pickle.loads.

    python bench/shm_ring.py --out benchmarks/results/shm-ring-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import sys
import time

import numpy as np

from albireo.bench.record import git_commit
from albireo.core.scheduler import CachedRequestData, SchedulerOutput
from albireo.executor.shm_ring import ShmRing, decode_plan, encode_plan

BLOCK_SIZE = 16
NUM_DISTINCT_PLANS = 32  # cycled through: enough to vary which requests get a new block


def make_plans(num_seqs: int, count: int = NUM_DISTINCT_PLANS) -> list[SchedulerOutput]:
    plans = []
    for step in range(count):
        cached = []
        for i in range(num_seqs):
            computed = 200 + 37 * i + step  # staggered lengths: block boundaries on different steps
            new_blocks = [1000 + i * 64 + computed // BLOCK_SIZE] if computed % BLOCK_SIZE == 0 else []
            cached.append(CachedRequestData(f"cmpl-{i}", new_blocks, computed))
        plans.append(SchedulerOutput([], cached, {c.req_id: 1 for c in cached}, set()))
    return plans


# ---- readers (forked processes) ------------------------------------------------------------------


def _signal(done, index: int, step: int) -> None:
    done[2 * index + 1] = time.perf_counter_ns()
    done[2 * index] = step


def _shm_reader(handle, index: int, done) -> None:
    ring = ShmRing.attach(handle, index)
    step = 0
    try:
        while True:
            ring.get_plan()
            step += 1
            _signal(done, index, step)
    except EOFError:
        pass
    ring.close()


def _pipe_reader(conn, index: int, done) -> None:
    step = 0
    while True:
        data = conn.recv_bytes()
        if not data:
            break
        pickle.loads(data)
        step += 1
        _signal(done, index, step)
    conn.close()


# ---- one measurement -----------------------------------------------------------------------------


def _wait_all(done, num_readers: int, step: int) -> int:
    """Spin (yielding) until every reader finished `step`; returns the last finish time."""
    while True:
        if all(done[2 * r] == step for r in range(num_readers)):
            return max(done[2 * r + 1] for r in range(num_readers))
        os.sched_yield()


def run_transport(transport: str, plans: list[SchedulerOutput], num_readers: int, steps: int, warmup: int) -> dict:
    ctx = mp.get_context("fork")
    done = ctx.RawArray("q", 2 * num_readers)
    procs, conns, ring = [], [], None
    if transport == "shm":
        ring = ShmRing.create(num_readers)
        for r in range(num_readers):
            procs.append(ctx.Process(target=_shm_reader, args=(ring.handle(), r, done)))
    else:
        for r in range(num_readers):
            recv, send = ctx.Pipe(duplex=False)
            procs.append(ctx.Process(target=_pipe_reader, args=(recv, r, done)))
            conns.append((recv, send))
    for p in procs:
        p.start()
    for recv, _ in conns:
        recv.close()  # the reader's end lives in the reader

    e2e, writer = [], []
    nbytes = 0
    clock = time.perf_counter_ns
    for step in range(1, warmup + steps + 1):
        plan = plans[step % len(plans)]
        t0 = clock()
        if ring is not None:
            data = encode_plan(plan)
            ring.put(data)
        else:
            data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            for _, send in conns:
                send.send_bytes(data)
        t1 = clock()
        t_done = _wait_all(done, num_readers, step)
        if step > warmup:
            e2e.append((t_done - t0) / 1e3)
            writer.append((t1 - t0) / 1e3)
            nbytes = len(data)

    if ring is not None:
        ring.close()
    else:
        for _, send in conns:
            send.send_bytes(b"")
            send.close()
    for p in procs:
        p.join(30)
    if ring is not None:
        ring.unlink()
    return {
        "e2e_us_median": statistics.median(e2e),
        "e2e_us_p90": float(np.percentile(e2e, 90)),
        "writer_us_median": statistics.median(writer),
        "bytes": nbytes,
    }


def time_codec(plans: list[SchedulerOutput], repeats: int) -> dict:
    def median_us(fn, args) -> float:
        samples = []
        for i in range(repeats):
            a = args[i % len(args)]
            t0 = time.perf_counter_ns()
            fn(a)
            samples.append((time.perf_counter_ns() - t0) / 1e3)
        return statistics.median(samples)

    encoded = [encode_plan(p) for p in plans]
    pickled = [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for p in plans]
    return {
        "encode_us": median_us(encode_plan, plans),
        "decode_us": median_us(decode_plan, encoded),
        "pickle_dumps_us": median_us(lambda p: pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL), plans),
        "pickle_loads_us": median_us(pickle.loads, pickled),
        "encoded_bytes": len(encoded[0]),
        "pickled_bytes": len(pickled[0]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,64,512", help="running decode sequences per plan")
    p.add_argument("--readers", default="1,2", help="reader process counts")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    reader_counts = [int(x) for x in args.readers.split(",")]

    load_before = os.getloadavg()
    codec, results = [], []
    for n in sizes:
        plans = make_plans(n)
        codec.append({"num_seqs": n, **time_codec(plans, args.steps)})
        for readers in reader_counts:
            for transport in ("shm", "pipe"):
                row = {"num_seqs": n, "readers": readers, "transport": transport}
                row.update(run_transport(transport, plans, readers, args.steps, args.warmup))
                results.append(row)
                print(
                    f"  n={n:4d} readers={readers} {transport:4s} e2e {row['e2e_us_median']:8.1f} us", file=sys.stderr
                )
    load_after = os.getloadavg()

    print(f"\nPer step, median of {args.steps} steps (us); e2e = encode .. last reader decoded")
    print(f"{'seqs':>5} {'readers':>7} | {'shm e2e':>8} {'p90':>7} {'writer':>7} | {'pipe e2e':>8} {'p90':>7} "
          f"{'writer':>7} | {'speedup':>7}")
    by_key = {(r["num_seqs"], r["readers"], r["transport"]): r for r in results}
    for n in sizes:
        for readers in reader_counts:
            s, q = by_key[(n, readers, "shm")], by_key[(n, readers, "pipe")]
            print(
                f"{n:>5} {readers:>7} | {s['e2e_us_median']:8.1f} {s['e2e_us_p90']:7.1f} {s['writer_us_median']:7.1f} | "
                f"{q['e2e_us_median']:8.1f} {q['e2e_us_p90']:7.1f} {q['writer_us_median']:7.1f} | "
                f"{q['e2e_us_median'] / s['e2e_us_median']:6.2f}x"
            )
    print(f"\nCodec alone, one process, median of {args.steps} calls (us)")
    print(f"{'seqs':>5} | {'encode':>7} {'decode':>7} {'bytes':>6} | {'dumps':>7} {'loads':>7} {'bytes':>6}")
    for c in codec:
        print(
            f"{c['num_seqs']:>5} | {c['encode_us']:7.1f} {c['decode_us']:7.1f} {c['encoded_bytes']:6d} | "
            f"{c['pickle_dumps_us']:7.1f} {c['pickle_loads_us']:7.1f} {c['pickled_bytes']:6d}"
        )

    if args.out:
        record = {
            "benchmark": "shm_ring",
            "device": "cpu",
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "steps": args.steps,
            "warmup": args.warmup,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "transport": results,
            "codec": codec,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
