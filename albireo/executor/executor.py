"""The engine core's handle on its workers.

With one device the worker lives in the engine-core process (UniProcExecutor). With tensor
parallelism each rank is a worker process (MultiProcExecutor) that receives every command in
order; rank 0 sends the sampled tokens back. A worker that dies makes the next wait fail with an
error naming its rank, and the other workers are stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

from albireo.config import EngineConfig
from albireo.core.scheduler import SampledTokens, SchedulerOutput
from albireo.executor.worker import Worker, run_worker
from albireo.runner.model_runner import StepHandle


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)

    def available_kv_blocks(self) -> int:
        return self.worker.available_kv_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

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
        self.conns = []
        self.procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=run_worker,
                args=(config, rank, world_size, init_method, child),
                name=f"albireo-worker-{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for rank in range(world_size):
            self._reply(rank)

    def _send(self, command: str, arg=None) -> None:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((command, arg))
            except (BrokenPipeError, OSError):
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
        self._send("available_kv_blocks")
        return min(self._reply(rank) for rank in range(len(self.procs)))

    def init_kv_cache(self, num_blocks: int) -> None:
        self._send("init_kv_cache", num_blocks)
        for rank in range(len(self.procs)):
            self._reply(rank)

    def execute_model(self, plan: SchedulerOutput) -> int:
        self._send("execute", plan)
        return 0

    def collect(self, handle: int) -> SampledTokens:
        self._send("collect")
        return self._reply(0)

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("shutdown", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self.conns, self.procs = [], []


def make_executor(config: EngineConfig) -> UniProcExecutor | MultiProcExecutor:
    if config.parallel.tensor_parallel_size == 1:
        return UniProcExecutor(config)
    return MultiProcExecutor(config)
