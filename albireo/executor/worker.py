"""One worker per device: owns the model runner and sizes the KV pool from its memory."""

from __future__ import annotations

import torch

from albireo import kernels
from albireo.config import EngineConfig
from albireo.core.scheduler import SampledTokens, SchedulerOutput
from albireo.runner.model_runner import ModelRunner, StepHandle


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.device = torch.device("cuda", rank) if config.device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        kernels.use_fused = config.fused_kernels
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

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self.runner.capture_cuda_graphs()

    def execute_model(self, plan: SchedulerOutput) -> StepHandle | None:
        return self.runner.execute(plan)

    def collect(self, handle: StepHandle | None) -> SampledTokens:
        return self.runner.collect(handle)
