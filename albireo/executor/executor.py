"""The engine core's handle on its workers; with one device the worker lives in this process."""

from __future__ import annotations

from albireo.config import EngineConfig
from albireo.core.scheduler import SampledTokens, SchedulerOutput
from albireo.executor.worker import Worker
from albireo.runner.model_runner import StepHandle


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        if config.parallel.tensor_parallel_size != 1:
            raise NotImplementedError("tensor_parallel_size > 1 is not implemented yet")
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
