"""The serial part of a step, measured: per-step breakdown with async scheduling on and off, the
serial fraction, and the tensor-parallel degree past which more GPUs stop paying.

Model: a step at TP degree t costs T(t) = T_gpu / t + T_comm(t) + T_serial, with T_gpu the GPU
compute of a step at t=1 (forward + sampling), T_serial the rest of the wall time of a step (host
work and copies the GPU waited for), and T_comm(t) = (all-reduces per step) x (latency of one),
zero at t=1. The predicted best degree t_e is the smallest t whose doubling gains under 10%.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import torch

from albireo.bench.record import MeasuredRegion
from albireo.bench.throughput import random_prompts
from albireo.profiling.step_timeline import DEVICE_PHASES, HOST_PHASES, StepSummary
from albireo.sampling_params import SamplingParams

TP_DEGREES = (1, 2, 4, 8, 16)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="W5")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--allreduce-us", type=float, default=18.0,
                        help="latency of one all-reduce inside a CUDA graph (BENCHMARKS.md: ~18 us on H100 x2)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.set_defaults(profile_steps=True)  # the breakdown is what this bench reports


def _prediction(step: dict[int, float]) -> dict:
    speedup = {t: step[1] / step[t] for t in TP_DEGREES}
    best = next((t for t in TP_DEGREES[:-1] if speedup[2 * t] / speedup[t] < 1.1), TP_DEGREES[-1])
    return {"predicted_step_ms": step, "predicted_speedup": speedup, "predicted_best_tp": best}


def predict(summary: StepSummary, allreduces_per_step: int, allreduce_us: float) -> dict:
    """From one GPU's step: its GPU work shrinks with t, the host's does not, all-reduces are added."""
    t_gpu, t_serial = summary.gpu_busy_ms, summary.serial_ms
    comm = allreduces_per_step * allreduce_us / 1000
    return _prediction({t: t_gpu / t + (comm if t > 1 else 0.0) + t_serial for t in TP_DEGREES})


def fit_measured(cost: dict[int, float], growing: bool = True) -> dict:
    """From measured costs per unit of work (ms per step, s per request, 1 / throughput) at two or more
    TP degrees: the least-squares fit cost(t) = a / t + b + c (t - 1), and what it predicts. a is the
    work that shrinks with t; b what does not (host work, kernels every rank runs whole); c what
    grows with every rank added (an all-reduce that sends each peer a copy, or waits on each).

    Two degrees fit only a and b, and so does growing=False. With three or more, c is fitted too,
    unless the fit makes it negative (noise), when it is dropped: on four H200s the a / t + b fit
    of TP=1 and TP=2 predicted W2 8B 3.02x faster at TP=4 and 2.64x was measured. One GPU's
    breakdown cannot tell GPU work that shrinks from GPU work that does not; measurements at
    several degrees can.
    """
    if len(cost) < 2:
        raise ValueError(f"fitting needs costs at two or more TP degrees, got {sorted(cost)}")
    degrees = sorted(cost)
    columns = np.array([[1 / t for t in degrees], [1.0] * len(degrees), [t - 1.0 for t in degrees]])
    measured = np.array([cost[t] for t in degrees])
    for num_terms in (3, 2) if growing and len(degrees) >= 3 else (2,):
        a, b, *rest = np.linalg.lstsq(columns[:num_terms].T, measured, rcond=None)[0].tolist()
        if not rest or rest[0] >= 0:
            break
    c = rest[0] if rest else 0.0
    return {"shrinking": a, "not_shrinking": b, "growing": c,
            **_prediction({t: a / t + b + c * (t - 1) for t in TP_DEGREES})}


def _profile(args: argparse.Namespace, make_llm) -> tuple[StepSummary, float, float | None, int | None, int]:
    llm = make_llm()
    engine = llm.engine
    prompts = random_prompts(args.num_prompts, args.input_len, engine.config.arch.vocab_size)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    with MeasuredRegion(llm) as region:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    summary, joules_per_token, retries = region.summary(), region.joules_per(tokens), region.retries
    layers = engine.config.arch.num_layers
    engine.shutdown()
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary, tokens / elapsed, joules_per_token, retries, 2 * layers


def plot(results: dict[str, StepSummary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (host_ax, dev_ax) = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
    modes = list(results)
    for ax, phases, title in ((host_ax, HOST_PHASES, "host (engine loop)"), (dev_ax, DEVICE_PHASES, "GPU")):
        left = [0.0] * len(modes)
        for phase in phases:
            widths = [results[m].phases_ms[phase] for m in modes]
            ax.barh(modes, widths, left=left, label=phase)
            left = [a + b for a, b in zip(left, widths)]
        for i, m in enumerate(modes):
            ax.plot([results[m].wall_ms] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
        ax.set_title(f"{title}; black: wall time per step")
        ax.set_xlabel("ms per step")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, make_llm) -> dict:
    results: dict[str, StepSummary] = {}
    record: dict = {"workload": args.workload, "model": args.model_name, "input_len": args.input_len,
                    "output_len": args.output_len, "num_prompts": args.num_prompts, "modes": {}}
    for mode in ("async", "sync"):
        args.async_scheduling = mode == "async"
        summary, tokens_per_s, joules_per_token, retries, allreduces = _profile(args, make_llm)
        results[mode] = summary
        record["modes"][mode] = {
            "output_tokens_per_s": tokens_per_s,
            "joules_per_output_token": joules_per_token,
            "allocator_retries": retries,
            **summary.as_record(),
        }
        if args.tensor_parallel_size == 1:  # the model extrapolates from one GPU's step
            record["modes"][mode].update(predict(summary, allreduces, args.allreduce_us))
        m = record["modes"][mode]
        print(f"{mode}: {tokens_per_s:.0f} tok/s, {summary.wall_ms:.2f} ms/step, serial fraction "
              f"{summary.serial_fraction:.3f}, GPU idle {summary.gpu_idle_fraction:.1%}, "
              f"predicted best TP {m.get('predicted_best_tp', '-')}"
              + ("" if joules_per_token is None else f", {joules_per_token:.4f} J per output token")
              + ("" if retries is None else f", {retries} allocator retries"))
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in summary.phases_ms.items()))
    png = Path(args.out_dir) / f"amdahl-{args.workload}-{args.model_name}-tp{args.tensor_parallel_size}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    record["plot"] = str(png)
    record["tp"] = args.tensor_parallel_size
    return record
