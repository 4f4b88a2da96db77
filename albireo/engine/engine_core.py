"""The engine core's loop: schedule a step, execute it, fold its tokens back into the requests."""

from __future__ import annotations

from albireo.config import EngineConfig
from albireo.core.scheduler import EngineCoreOutput, Scheduler
from albireo.engine.request import Request
from albireo.executor.executor import UniProcExecutor


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = UniProcExecutor(config)
        num_blocks = self.executor.available_kv_blocks()
        needed = -(-config.max_model_len // config.cache.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache has room for {num_blocks} blocks of {config.cache.block_size} tokens, fewer than "
                f"the {needed} one sequence of max_model_len={config.max_model_len} needs: raise the memory "
                "budget (gpu_memory_utilization / cpu_kv_cache_gb) or lower max_model_len"
            )
        self.executor.init_kv_cache(num_blocks)
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, config.max_model_len)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        if not self.scheduler.has_unfinished_requests():
            return []
        plan = self.scheduler.schedule()
        sampled = self.executor.execute_model(plan)
        return self.scheduler.update_from_output(plan, sampled)

    def shutdown(self) -> None:
        self.executor.shutdown()
