"""One process per rank on this machine, for the benchmarks and device tests of collectives."""

from __future__ import annotations

import argparse
import json
import queue as queue_module
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from albireo.bench.record import device_name, git_commit
from albireo.executor.executor import free_port


def run_ranks(target: Callable, world: int, *args, timeout: float | None = 240):
    """Run target(rank, world, port, queue, *args) in `world` spawned processes; returns the first
    thing a rank puts on the queue. A rank that fails before then ends the wait at once, with an
    error naming it: its peers would otherwise wait for it in a collective until the timeout. Ranks
    still tearing down NCCL 10 s after the result are killed: they are done, and that can take
    longer than the work."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, queue, *args), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                return queue.get(timeout=1.0)
            except queue_module.Empty:
                failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed:
                    for p in procs:
                        p.kill()
                    rank, code = failed[0]
                    raise RuntimeError(f"rank {rank} of {world} exited with code {code} before any result") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def file_times(results: dict, key: str, times: dict, rank: int) -> None:
    """Once every rank has timed `key` (a barrier, so that none is still timing against a peer),
    file its times under it, and print them on rank 0."""
    dist.barrier()
    results[key] = times
    if rank == 0:
        print(f"{key} " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()), flush=True)


def hand_back(queue, rank: int, result) -> None:
    """A rank's last step under run_ranks: once every rank is done (a barrier, so that none still
    reads a peer's memory), rank 0 puts `result` on the queue, and every rank leaves the group."""
    dist.barrier()
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def two_rank_rows_benchmark(name: str, doc: str, target: Callable, unit: str, calls: int, timeout: float,
                            *options: tuple[str, list[int]]) -> None:
    """The command line of a benchmark of two ranks swept over `--rows` (and over each option, a
    list of whole numbers with its default): runs target(rank, world, port, queue, rows, *options)
    under run_ranks and writes rank 0's results to `--out` as a record."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024])
    for option, default in options:
        parser.add_argument(option, type=int, nargs="+", default=default)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    values = [getattr(args, option.lstrip("-").replace("-", "_")) for option, _ in options]
    results = run_ranks(target, 2, args.rows, *values, timeout=timeout)
    record = {"benchmark": name, "device": device_name(), "commit": git_commit(), "calls_per_graph": calls,
              "unit": unit, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
