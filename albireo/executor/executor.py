"""The engine core's handle on its workers.

With one device the worker lives in the engine-core process (UniProcExecutor). With tensor
parallelism each rank is a worker process (MultiProcExecutor) that reads every command, in order,
from its node's shared-memory ring (step plans in a compact binary encoding, no pickle per step);
rank 0 sends the sampled tokens back over a pipe. The engine runs on node 0; with several nodes
the same commands also go to the other nodes' rings through the relay (node_relay.py). A worker
or node that dies makes the next wait fail with an error naming it, and the other workers are
stopped.
"""

from __future__ import annotations

import socket
import time

from albireo.config import EngineConfig
from albireo.core.scheduler import SampledTokens, SchedulerOutput
from albireo.distributed.parallel_state import Rendezvous
from albireo.executor.node_relay import RemoteNodes
from albireo.executor.shm_ring import encode_plan
from albireo.executor.worker import AVAILABLE_KV_BLOCKS, COLLECT, EXECUTE, INIT_KV_CACHE, Worker
from albireo.executor.worker_group import WorkerDiedError, WorkerGroup
from albireo.runner.model_runner import StepHandle


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)

    def available_kv_blocks(self) -> int:
        return self.worker.available_kv_blocks()

    def init_kv_cache(self, num_blocks: int) -> int:
        """Allocate the KV pool; returns the number of host-tier blocks (0 without the tier)."""
        return self.worker.init_kv_cache(num_blocks)

    def execute_model(self, plan: SchedulerOutput) -> StepHandle | None:
        """Launch a step; its tokens come back through collect()."""
        return self.worker.execute_model(plan)

    def collect(self, handle: StepHandle | None) -> SampledTokens:
        return self.worker.collect(handle)

    def shutdown(self) -> None:
        pass


def free_port() -> int:
    """A TCP port on the loopback nobody listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        par = config.parallel
        self.world_size = par.tensor_parallel_size
        self.remote: RemoteNodes | None = None
        if par.nnodes == 1:
            rendezvous = Rendezvous("127.0.0.1", free_port())
        else:
            if par.node_rank != 0:
                raise ValueError(
                    f"node_rank is {par.node_rank}, but the engine runs on node 0 only: start node "
                    f"{par.node_rank} with `albireo worker-node` and the same engine arguments"
                )
            rendezvous = Rendezvous(par.master_addr, par.master_port)
            self.remote = RemoteNodes(config)
        self.workers = WorkerGroup(config, node_rank=0, rendezvous=rendezvous)
        for rank in range(self.world_size):
            self._reply(rank)

    def _send(self, command: bytes, payload: bytes = b"") -> None:
        """Broadcast a command to every rank, on this node and, through the relay, on the others."""
        message = command + payload
        self.workers.put(message, on_wait=self._check)
        if self.remote is not None:
            self.remote.send(message)

    def _reply(self, rank: int):
        """Wait for a rank's answer, watching every worker so that a dead one cannot hang us."""
        if rank not in self.workers.ranks:
            while (reply := self.remote.reply(rank, timeout=0.05)) is None:
                self._check()
            return reply.value
        conn = self.workers.conns[rank]
        while not conn.poll(0.05):
            self._check()
        try:
            status, value = conn.recv()
        except EOFError:
            self._fail(WorkerGroup.death(rank, self.workers.procs[rank].exitcode))
        if status == "error":
            # A collective fails on every rank when one rank dies: name the dead one if there is one.
            time.sleep(0.2)
            self._fail(self._failure(crashed_only=True) or f"worker rank {rank} failed:\n{value}")
        return value

    def _failure(self, crashed_only: bool) -> str | None:
        dead = self.workers.dead(crashed_only)
        if dead is not None:
            return WorkerGroup.death(*dead)
        return None if self.remote is None else self.remote.failure(crashed_only)

    def _check(self) -> None:
        failure = self._failure(crashed_only=False)
        if failure is not None:
            self._fail(failure)

    def _fail(self, failure: str) -> None:
        self.shutdown()
        raise WorkerDiedError(f"the engine stopped its workers: {failure}")

    def available_kv_blocks(self) -> int:
        self._send(AVAILABLE_KV_BLOCKS)
        return min(self._reply(rank) for rank in range(self.world_size))

    def init_kv_cache(self, num_blocks: int) -> int:
        self._send(INIT_KV_CACHE, num_blocks.to_bytes(8, "little"))
        return min(self._reply(rank) for rank in range(self.world_size))

    def execute_model(self, plan: SchedulerOutput) -> int:
        self._send(EXECUTE, encode_plan(plan))
        return 0

    def collect(self, handle: int) -> SampledTokens:
        self._send(COLLECT)
        return self._reply(0)

    def shutdown(self) -> None:
        if self.remote is not None:
            self.remote.close()
        self.workers.shutdown()


def make_executor(config: EngineConfig) -> UniProcExecutor | MultiProcExecutor:
    if config.parallel.tensor_parallel_size == 1:
        return UniProcExecutor(config)
    return MultiProcExecutor(config)
