"""One process per rank on this machine, for the benchmarks and device tests of collectives."""

from __future__ import annotations

from collections.abc import Callable

import torch.multiprocessing as mp

from albireo.executor.executor import free_port


def run_ranks(target: Callable, world: int, *args, timeout: float | None = 240):
    """Run target(rank, world, port, queue, *args) in `world` spawned processes; returns the first
    thing a rank puts on the queue. Ranks still tearing down NCCL 10 s later are killed: they are
    done, and that can take longer than the work."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, queue, *args), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
