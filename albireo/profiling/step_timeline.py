"""Where a step's time goes: host phases of the engine loop and GPU work, step by step.

The engine core times its host phases (schedule, launch = stage inputs and enqueue the forward,
wait = blocked on the oldest step's tokens, update = fold them into the requests). The runner
brackets its GPU work with CUDA events: forward, sampling, and the idle gap between the end of one
step's GPU work and the start of the next (time the GPU waited for the host). On a CPU device the
forward and sampling are timed on the host and there is no gap to measure.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

HOST_PHASES = ("schedule", "launch", "wait", "update")
DEVICE_PHASES = ("forward", "sample", "gpu_idle")


@dataclass
class StepSummary:
    """Mean milliseconds per step of each phase, over the steps recorded."""

    num_steps: int
    wall_ms: float
    phases_ms: dict[str, float]
    # Each phase's milliseconds step by step, to see how a run's steps change (prefill, then decode).
    per_step_ms: dict[str, list[float]] | None = None

    @property
    def gpu_busy_ms(self) -> float:
        return self.phases_ms["forward"] + self.phases_ms["sample"]

    @property
    def serial_ms(self) -> float:
        """The part of a step that is not GPU compute: what more GPUs cannot shrink."""
        return max(self.wall_ms - self.gpu_busy_ms, 0.0)

    @property
    def serial_fraction(self) -> float:
        return self.serial_ms / self.wall_ms if self.wall_ms else 0.0

    @property
    def gpu_idle_fraction(self) -> float:
        return self.phases_ms["gpu_idle"] / self.wall_ms if self.wall_ms else 0.0

    def as_record(self) -> dict:
        return {
            "steps": self.num_steps,
            "wall_ms_per_step": self.wall_ms,
            "phases_ms_per_step": self.phases_ms,
            "serial_fraction": self.serial_fraction,
            "gpu_idle_fraction": self.gpu_idle_fraction,
            "per_step_ms": {name: [round(ms, 3) for ms in values] for name, values in (self.per_step_ms or {}).items()},
        }


class StepTimeline:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded (a benchmark's warm-up)."""
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.steps = 0
        self.started: float | None = None
        self.stopped: float | None = None

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.samples[name].append((time.perf_counter() - start) * 1e3)

    def add_device_times(self, times: dict[str, float]) -> None:
        self.steps += 1
        if self.started is None:
            self.started = time.perf_counter()
        self.stopped = time.perf_counter()
        for name, ms in times.items():
            self.samples[name].append(ms)

    def summary(self) -> StepSummary:
        steps = max(self.steps - 1, 1)
        wall = ((self.stopped or 0) - (self.started or 0)) * 1e3 / steps
        phases = {
            name: statistics.fmean(self.samples[name]) if self.samples[name] else 0.0
            for name in HOST_PHASES + DEVICE_PHASES
        }
        per_step = {name: list(self.samples[name]) for name in HOST_PHASES + DEVICE_PHASES if self.samples[name]}
        return StepSummary(self.steps, wall, phases, per_step)
