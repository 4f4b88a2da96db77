"""One process per rank on this machine, for the benchmarks and device tests of collectives."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on the loopback nobody listens on now (for the ranks' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
