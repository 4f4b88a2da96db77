"""The engine core's handle on its workers.

With one device the worker lives in the engine-core process (UniProcExecutor). With tensor
parallelism each rank is a worker process (MultiProcExecutor) that reads every command, in order,
from one shared-memory ring (step plans in a compact binary encoding, no pickle per step); rank 0
sends the sampled tokens back over a pipe. A worker that dies makes the next wait fail with an
error naming its rank, and the other workers are stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

from albireo.config import EngineConfig
from albireo.core.scheduler import SampledTokens, SchedulerOutput
from albireo.executor.shm_ring import ShmRing, encode_plan
from albireo.executor.worker import (
    AVAILABLE_KV_BLOCKS,
    COLLECT,
    EXECUTE,
    INIT_KV_CACHE,
    SHUTDOWN,
    Worker,
    run_worker,
)
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


class WorkerDiedError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        world_size = config.parallel.tensor_parallel_size
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.ring = ShmRing.create(num_readers=world_size)
        self.conns = []
        self.procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=run_worker,
                args=(config, rank, world_size, init_method, self.ring.handle(), child),
                name=f"albireo-worker-{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for rank in range(world_size):
            self._reply(rank)

    def _send(self, command: bytes, payload: bytes = b"") -> None:
        """Broadcast a command; while the ring is full, check that every reader is still alive."""
        message = command + payload
        while True:
            try:
                self.ring.put(message, timeout=0.1)
                return
            except TimeoutError:
                for rank, proc in enumerate(self.procs):
                    if not proc.is_alive():
                        self._fail(rank)

    def _reply(self, rank: int):
        """Wait for a rank's answer, watching every worker so that a dead one cannot hang us."""
        conn = self.conns[rank]
        while not conn.poll(0.05):
            for r, proc in enumerate(self.procs):
                if not proc.is_alive():
                    self._fail(r)
        try:
            status, value = conn.recv()
        except EOFError:
            self._fail(rank)
        if status == "error":
            # A collective fails on every rank when one rank dies: name the dead one if there is one.
            time.sleep(0.2)
            dead = [r for r, proc in enumerate(self.procs) if not proc.is_alive() and proc.exitcode != 0]
            if dead:
                self._fail(dead[0])
            self.shutdown()
            raise WorkerDiedError(f"worker rank {rank} failed:\n{value}")
        return value

    def _fail(self, rank: int) -> None:
        code = self.procs[rank].exitcode
        self.shutdown()
        raise WorkerDiedError(f"worker rank {rank} died (exit code {code}); the engine has stopped its other workers")

    def available_kv_blocks(self) -> int:
        self._send(AVAILABLE_KV_BLOCKS)
        return min(self._reply(rank) for rank in range(len(self.procs)))

    def init_kv_cache(self, num_blocks: int) -> int:
        self._send(INIT_KV_CACHE, num_blocks.to_bytes(8, "little"))
        return min(self._reply(rank) for rank in range(len(self.procs)))

    def execute_model(self, plan: SchedulerOutput) -> int:
        self._send(EXECUTE, encode_plan(plan))
        return 0

    def collect(self, handle: int) -> SampledTokens:
        self._send(COLLECT)
        return self._reply(0)

    def shutdown(self) -> None:
        if self.ring.closed:
            return
        try:
            self.ring.put(SHUTDOWN, timeout=1.0)
        except TimeoutError:
            pass  # a reader is gone or stuck: it is killed below
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self.ring.unlink()


def make_executor(config: EngineConfig) -> UniProcExecutor | MultiProcExecutor:
    if config.parallel.tensor_parallel_size == 1:
        return UniProcExecutor(config)
    return MultiProcExecutor(config)
