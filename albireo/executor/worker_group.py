"""One node's worker processes: one per local rank, all reading their commands from one ring.

The engine core's executor owns the group of node 0; on every other node `albireo worker-node`
owns that node's group (albireo/executor/node_relay.py). Either owner puts each command on the
ring, reads the replies from the per-rank pipes and watches the processes, so that a dead worker
fails its waits instead of hanging them.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from albireo.config import EngineConfig
from albireo.distributed.parallel_state import Rendezvous
from albireo.executor.shm_ring import ShmRing
from albireo.executor.worker import SHUTDOWN, run_worker


class WorkerDiedError(RuntimeError):
    """A worker (or a whole node of them) died or failed; the engine has stopped all its workers."""


class WorkerGroup:
    def __init__(self, config: EngineConfig, node_rank: int, rendezvous: Rendezvous) -> None:
        per_node = config.parallel.ranks_per_node
        self.ranks = range(node_rank * per_node, (node_rank + 1) * per_node)
        self.ring = ShmRing.create(num_readers=per_node)
        # Keyed by global rank.
        self.conns: dict[int, Connection] = {}
        self.procs: dict[int, BaseProcess] = {}
        ctx = mp.get_context("spawn")
        for local_rank, rank in enumerate(self.ranks):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=run_worker,
                args=(config, rank, local_rank, rendezvous, self.ring.handle(), child),
                name=f"albireo-worker-{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns[rank] = parent
            self.procs[rank] = proc

    def put(self, message: bytes, on_wait: Callable[[], None]) -> None:
        """Hand a command to every worker; while the ring is full, call `on_wait` (a liveness check)."""
        while True:
            try:
                self.ring.put(message, timeout=0.1)
                return
            except TimeoutError:
                on_wait()

    @staticmethod
    def death(rank: int, exitcode: int | None, node: int | None = None) -> str:
        """How a worker's exit is reported, everywhere it is reported."""
        where = "" if node is None else f" on node {node}"
        return f"worker rank {rank}{where} died (exit code {exitcode})"

    def dead(self, crashed_only: bool = False) -> tuple[int, int | None] | None:
        """(rank, exit code) of a worker that has exited (with a nonzero code, if `crashed_only`)."""
        for rank, proc in self.procs.items():
            if not proc.is_alive() and not (crashed_only and proc.exitcode == 0):
                return rank, proc.exitcode
        return None

    def shutdown(self) -> None:
        if self.ring.closed:
            return
        try:
            self.ring.put(SHUTDOWN, timeout=1.0)
        except TimeoutError:
            pass  # a reader is gone or stuck: it is killed below
        for proc in self.procs.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self.ring.unlink()
