"""One worker per device: owns the model runner and sizes the KV pool from its memory."""

from __future__ import annotations

import os
import random
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection

import torch

from albireo import heap, kernels
from albireo.config import EngineConfig
from albireo.core.scheduler import SampledTokens, SchedulerOutput
from albireo.distributed.parallel_state import (
    Rendezvous,
    enable_symm_all_reduce,
    init_distributed,
    shutdown_distributed,
)
from albireo.executor.shm_ring import ShmRing, ShmRingHandle, decode_plan
from albireo.profiling.worker_profile import WorkerProfiler
from albireo.runner.model_runner import ModelRunner, StepHandle

# Command tags: the first byte of each message on the ring.
EXECUTE, COLLECT, AVAILABLE_KV_BLOCKS, INIT_KV_CACHE, SHUTDOWN = b"E", b"C", b"K", b"I", b"S"


class Worker:
    def __init__(self, config: EngineConfig, local_rank: int = 0) -> None:
        """`local_rank`: the rank among this node's workers, which is the index of its GPU."""
        self.config = config
        self.device = torch.device("cuda", local_rank) if config.device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.parallel.peer_memory:
            dtype = config.model.torch_dtype(self.device)
            # The largest row-parallel output: a full token budget of hidden states.
            largest = config.scheduler.max_num_batched_tokens * config.arch.hidden_size * dtype.itemsize
            enable_symm_all_reduce(self.device, dtype, largest)
        kernels.use_fused = config.fused_kernels
        # On the all-gather sampling path every rank samples every row: identical random streams
        # keep their tokens, and so their KV caches, identical.
        random.seed(config.model.seed)
        self.runner = ModelRunner(config, self.device)

    def available_kv_blocks(self) -> int:
        """How many KV blocks fit in this device's budget once the model is loaded."""
        cache = self.config.cache
        if cache.num_blocks_override is not None:
            return cache.num_blocks_override
        if self.device.type == "cuda":
            peak = self.runner.profile_peak_memory()
            free, total = torch.cuda.mem_get_info(self.device)
            # Memory held outside this process's allocator (other processes, the CUDA context).
            foreign = total - free - torch.cuda.memory_reserved(self.device)
            budget = total * cache.gpu_memory_utilization - foreign - peak
        else:
            budget = cache.cpu_kv_cache_gb * 2**30
        return max(int(budget // self.runner.kv_cache_bytes_per_block()), 0)

    def init_kv_cache(self, num_blocks: int) -> int:
        """Allocate the KV pool (and the host tier); returns the host tier's number of blocks."""
        self.runner.init_kv_cache(num_blocks)
        num_host_blocks = self.runner.init_host_tier(self.config.cache.kv_offload_gb)
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self.runner.capture_cuda_graphs()
        return num_host_blocks

    def execute_model(self, plan: SchedulerOutput) -> StepHandle | None:
        return self.runner.execute(plan)

    def collect(self, handle: StepHandle | None) -> SampledTokens:
        return self.runner.collect(handle)


def run_worker(
    config: EngineConfig,
    rank: int,
    local_rank: int,
    rendezvous: Rendezvous,
    ring: ShmRingHandle,
    conn: Connection,
) -> None:
    """A worker process: join the TP group, build this rank's shard, then serve the engine's commands.

    `rank` is the global TP rank; `local_rank` the worker's index on its node (its reader index on
    the node's ring, and its GPU).

    Commands arrive in order on the shared-memory ring, one tag byte then the payload (a step plan
    in the ring's compact encoding for "execute"); replies go back on `conn`. "execute" launches a
    step and "collect" finishes the oldest launched one (rank 0 sends its tokens back), so a step
    can be launched before the previous one is collected, as the engine core's async loop does.
    """
    _exit_with_parent()
    commands = None
    try:
        backend = "nccl" if config.device == "cuda" else "gloo"
        init_distributed(rank, config.parallel.tensor_parallel_size, rendezvous, backend)
        commands = ShmRing.attach(ring, local_rank)
        worker = Worker(config, local_rank)
        conn.send(("ok", None))
        profiler = WorkerProfiler.from_env(rank)
        launched: deque[StepHandle | None] = deque()
        while True:
            message = commands.get()
            command, payload = message[:1], memoryview(message)[1:]
            if command == EXECUTE:
                if profiler is not None:
                    profiler.before_step()
                launched.append(worker.execute_model(decode_plan(payload)))
            elif command == COLLECT:
                result = worker.collect(launched.popleft())
                if rank == 0:
                    conn.send(("ok", result))
            elif command == AVAILABLE_KV_BLOCKS:
                conn.send(("ok", worker.available_kv_blocks()))
            elif command == INIT_KV_CACHE:
                conn.send(("ok", worker.init_kv_cache(int.from_bytes(payload, "little"))))
                heap.settle()  # a worker ends with its engine: nothing frozen needs collecting later
            elif command == SHUTDOWN:
                break
    except (EOFError, KeyboardInterrupt):
        pass  # the engine went away: exit quietly
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        if commands is not None:
            commands.close()
        shutdown_distributed()


def _exit_with_parent() -> None:
    """Leave as soon as the process that started this worker is gone, wherever the worker waits.

    The ring tells a worker that reads it when its writer died, but a worker blocked elsewhere, in
    torch.distributed's rendezvous for ranks of a node that never comes or in a collective, would
    otherwise outlive its (killed) parent for as long as torch's timeouts.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="albireo-parent-watch", daemon=True).start()
