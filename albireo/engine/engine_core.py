"""The engine core's loop: schedule a step, execute it, fold its tokens back into the requests."""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext

from albireo import heap
from albireo.config import EngineConfig
from albireo.core.scheduler import EngineCoreOutput, Scheduler
from albireo.engine.request import Request
from albireo.executor.executor import make_executor
from albireo.profiling.step_timeline import StepTimeline


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = make_executor(config)
        num_blocks = self.executor.available_kv_blocks()
        needed = -(-config.max_model_len // config.cache.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache has room for {num_blocks} blocks of {config.cache.block_size} tokens, fewer than "
                f"the {needed} one sequence of max_model_len={config.max_model_len} needs: raise the memory "
                "budget (gpu_memory_utilization / cpu_kv_cache_gb) or lower max_model_len"
            )
        num_host_blocks = self.executor.init_kv_cache(num_blocks)
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, config.max_model_len, num_host_blocks)
        # Steps launched whose results have not been folded back yet: at most one under async
        # scheduling, none in the sequential loop.
        self.in_flight: deque = deque()
        self.timeline = StepTimeline() if config.profile_steps else None
        heap.collect_less_often()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """Launch the next step, then fold in the results of the step before it.

        Under async scheduling the GPU runs step N while this plans and launches step N+1; only
        then does it wait for step N's tokens. While a request with penalties is unfinished, each
        step waits for the previous tokens first: penalties count them on the host.
        """
        if self.scheduler.has_unfinished_requests():
            if self.in_flight and self.scheduler.num_penalized:
                return self._collect_oldest()
            with self._phase("schedule"):
                plan = self.scheduler.schedule()
            with self._phase("launch"):
                self.in_flight.append((plan, self.executor.execute_model(plan)))
            if len(self.in_flight) == 1 and self.config.scheduler.async_scheduling and not plan.is_empty:
                return []
        return self._collect_oldest() if self.in_flight else []

    def _collect_oldest(self) -> list[EngineCoreOutput]:
        plan, handle = self.in_flight.popleft()
        with self._phase("wait"):
            sampled = self.executor.collect(handle)
        if self.timeline is not None and sampled.device_times is not None:
            self.timeline.add_device_times(sampled.device_times)
        with self._phase("update"):
            return self.scheduler.update_from_output(plan, sampled)

    def _phase(self, name: str):
        return self.timeline.phase(name) if self.timeline is not None else nullcontext()

    def shutdown(self) -> None:
        self.executor.shutdown()
