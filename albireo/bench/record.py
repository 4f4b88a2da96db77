"""Benchmark records: one JSON file per run under benchmarks/results/, an NVML energy meter, and
the CUDA-graph timer of the kernel micro-benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import torch

from albireo import kernels


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def git_commit() -> str:
    """HEAD's short hash; ALBIREO_COMMIT wins (a copy of the tree without .git, as on the GPU machine)."""
    if os.environ.get("ALBIREO_COMMIT"):
        return os.environ["ALBIREO_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def engine_facts(llm, args) -> dict:
    """The record fields that describe the engine a benchmark ran on."""
    from albireo.distributed import parallel_state, symm_all_reduce
    from albireo.layers import linear
    from albireo.runner import model_runner

    config = llm.engine.config
    return {
        "workload": args.workload,
        "model": args.model_name,
        "tp": config.parallel.tensor_parallel_size,
        "tp_sampling": config.parallel.sampling,
        "all_reduce": config.parallel.all_reduce,
        "async_scheduling": config.scheduler.async_scheduling,
        "cuda_graphs": config.device == "cuda" and not config.enforce_eager,
        "fused_kernels": config.fused_kernels,
        # Programmatic dependent launch (albireo/kernels/pdl.py), switched off by ALBIREO_PDL=0.
        "pdl": config.device == "cuda" and kernels.use_pdl,
        # The kernels before a GEMV or a norm letting it launch before they wait, ALBIREO_EARLY_LAUNCH=0 off.
        "early_launch": config.device == "cuda" and kernels.use_pdl and kernels.early_launch,
        "copy_streams": config.device == "cuda" and model_runner.COPY_STREAMS,
        # TP=1 matmuls adding into the residual stream (albireo/layers/linear.py), ALBIREO_GEMM_RESIDUAL=0 off.
        "gemm_residual": (config.device == "cuda" and config.fused_kernels and linear.GEMM_RESIDUAL
                          and config.parallel.tensor_parallel_size == 1),
        # Large all-reduces of GPU ranks on the copy engines, switched off by ALBIREO_CE_ALL_REDUCE=0.
        "copy_engine_all_reduce": (config.device == "cuda" and config.parallel.tensor_parallel_size > 1
                                   and config.parallel.peer_memory and parallel_state.copy_engine_all_reduce_on),
        # Batch-1 GEMVs sending their all-reduce part themselves (TP > 1), ALBIREO_GEMV_PUSH=0 off.
        "gemv_push": (config.device == "cuda" and config.fused_kernels and linear.GEMV_PUSH
                      and config.parallel.tensor_parallel_size > 1 and config.parallel.peer_memory),
        # Past two GPU ranks, our two-shot kernel for mid-size all-reduces, ALBIREO_TWO_SHOT_PUSH=0 off.
        "two_shot_push": (config.device == "cuda" and config.parallel.tensor_parallel_size > 2
                          and config.parallel.peer_memory and symm_all_reduce.TWO_SHOT_PUSH),
        "kv_cache_dtype": config.cache.kv_cache_dtype,
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "input_len": args.input_len,
        "output_len": args.output_len,
    }


def write_record(record: dict, out_dir: str | Path) -> Path:
    """Add the run's context (device, torch, commit, date) and write it; returns the path."""
    now = datetime.datetime.now(datetime.UTC)
    record = {
        **record,
        "device": device_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{record.get('workload', 'run')}-{record.get('model', 'model')}-tp{record.get('tp', 1)}-{now:%Y%m%dT%H%M%S}.json"
    path = out / name
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


class EnergyMeter:
    """Joules used by the given GPUs between start() and stop(), from NVML's total-energy counter."""

    def __init__(self, num_gpus: int = 1) -> None:
        self.handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(num_gpus)]
            self._read = pynvml.nvmlDeviceGetTotalEnergyConsumption
        except Exception:  # no NVML (CPU machine, or the library is missing): energy is not reported
            self.handles = []
        self.start_mj: list[int] = []

    def _now(self) -> list[int]:
        return [self._read(h) for h in self.handles]

    def start(self) -> None:
        if self.handles:
            self.start_mj = self._now()

    def stop(self) -> float | None:
        if not self.handles:
            return None
        return sum(b - a for a, b in zip(self.start_mj, self._now())) / 1000.0


class MeasuredRegion:
    """The timed part of a benchmark: its energy, and with --profile-steps its per-step breakdown.

        with MeasuredRegion(llm) as region:
            ... generate ...
        record.update(region.fields(num_output_tokens))
    """

    def __init__(self, llm) -> None:
        self.timeline = llm.engine.core.timeline
        self.meter = EnergyMeter(llm.engine.config.parallel.tensor_parallel_size)
        self.joules: float | None = None
        # The allocator's retries (each frees its cache, which synchronizes the device) and fresh
        # cudaMallocs in this process: the model runs here at TP=1.
        self.allocator = torch.cuda.is_initialized()
        self.retries: int | None = None
        self.mallocs: int | None = None

    def __enter__(self) -> Self:
        if self.timeline is not None:
            self.timeline.reset()  # drop the warm-up's steps
        if self.allocator:
            stats = torch.cuda.memory_stats()
            self.retries, self.mallocs = -stats["num_alloc_retries"], -stats["num_device_alloc"]
        self.meter.start()
        return self

    def __exit__(self, *exc) -> None:
        self.joules = self.meter.stop()
        if self.allocator:
            stats = torch.cuda.memory_stats()
            self.retries += stats["num_alloc_retries"]
            self.mallocs += stats["num_device_alloc"]

    def joules_per(self, num_output_tokens: int) -> float | None:
        return None if self.joules is None else self.joules / num_output_tokens

    def summary(self):
        """The region's StepSummary (needs --profile-steps)."""
        return self.timeline.summary()

    def fields(self, num_output_tokens: int) -> dict:
        out = {"joules_per_output_token": self.joules_per(num_output_tokens), "allocator_retries": self.retries,
               "cuda_mallocs": self.mallocs}
        if self.timeline is not None:
            out["step_breakdown"] = self.summary().as_record()
        return out


def weight_copies(n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Random [n, k] CUDA weights (std 0.02), as many copies as it takes for 160 MiB, at least two:
    calls cycling through them overflow L2, so each streams its weight from device memory."""
    copies = max(2, -(-160 * 2**20 // (n * k * dtype.itemsize)))
    return [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]


def graph_us(step: Callable[[], object], calls: int, replays: int = 20) -> float:
    """Microseconds per call of `step`, which makes `calls` calls: captured once in a CUDA graph and
    replayed, after one eager run (compilation, allocation) outside the capture."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's watchdog thread may query
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def host_us(fn: Callable[[], object], calls: int, busy_cycles: int = 0) -> float:
    """Microseconds the host takes per call of fn, launches only: the GPU is idle when the calls
    start, or busy for busy_cycles more (a sleeping kernel ahead, as when the host runs ahead of it),
    and `calls` must be few enough that the launch queue never fills and blocks the host."""
    torch.cuda.synchronize()
    if busy_cycles:
        torch.cuda._sleep(busy_cycles)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e6 / calls
