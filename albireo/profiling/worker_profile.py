"""torch.profiler inside a TP worker process, where a TP step's kernels and all-reduces run.

Set ALBIREO_PROFILE_WORKER="SKIP:STEPS:PATH" before the engine starts: every rank skips SKIP
launched steps and profiles the next STEPS (all of them, so that the profiler slows no rank more than
another); rank 0 writes the kernel table to PATH (bench/profile_steps.py --tensor-parallel-size does
this), and every rank its Chrome trace to ALBIREO_PROFILE_WORKER_TRACE if set, rank r > 0 with
`.rank{r}` before the extension (an all-reduce's wait on one rank is the other's lateness).
"""

from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile

ENV = "ALBIREO_PROFILE_WORKER"
TRACE_ENV = "ALBIREO_PROFILE_WORKER_TRACE"


def rank_path(path: str | None, rank: int) -> str | None:
    """Rank r's copy of a trace path: `w2.json.gz` -> `w2.rank1.json.gz`; rank 0's is the path itself."""
    if not path or rank == 0:
        return path
    directory, name = os.path.split(path)
    stem, dot, rest = name.partition(".")
    return os.path.join(directory, f"{stem}.rank{rank}{dot}{rest}")


class WorkerProfiler:
    def __init__(self, skip: int, steps: int, path: str | None, trace: str | None = None) -> None:
        self.skip, self.steps, self.path, self.trace = skip, steps, path, trace
        self.seen = 0
        self.prof: profile | None = None

    @classmethod
    def from_env(cls, rank: int) -> WorkerProfiler | None:
        spec = os.environ.get(ENV)
        if not spec:
            return None
        skip, steps, path = spec.split(":", 2)
        return cls(int(skip), int(steps), path if rank == 0 else None, rank_path(os.environ.get(TRACE_ENV), rank))

    def before_step(self) -> None:
        """Called before each step is launched."""
        on_gpu = torch.cuda.is_available()
        if self.seen == self.skip:
            if on_gpu:
                torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu)
            self.prof.__enter__()
        elif self.seen == self.skip + self.steps and self.prof is not None:
            if on_gpu:
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            if self.trace:
                self.prof.export_chrome_trace(self.trace)
            if self.path:
                self._write_table(on_gpu)
            self.prof = None
        self.seen += 1

    def _write_table(self, on_gpu: bool) -> None:
        events = self.prof.key_averages()
        sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        device_ms = sum(e.self_device_time_total for e in events) / 1e3 / self.steps
        with open(self.path, "w") as f:
            f.write(f"rank 0, {self.steps} steps: device busy {device_ms:.2f} ms/step\n")
            f.write(events.table(sort_by=sort, row_limit=30, max_name_column_width=70))
