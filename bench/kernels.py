"""Time the fused Triton kernels against the plain torch code they replace, on one CUDA GPU.

    python bench/kernels.py --out kernels.json

For llama-3.2-1b and llama-3.1-8b at T tokens in {1, 64, 256, 1024, 4096} it times

    rms_norm           RMSNorm.forward(x)                 vs  triton_fused.rms_norm(x, w, eps)
    rms_norm+residual  RMSNorm.forward(x, residual)       vs  triton_fused.rms_norm(x, w, eps, residual)
    rotary             RotaryEmbedding.forward(pos, q, k) vs  triton_fused.apply_rotary(pos, q, k, cos, sin)
    silu_and_mul       F.silu(gate) * up (LlamaMLP)       vs  triton_fused.silu_and_mul(gate_up)

on the same input tensors (q and k are [T, H, D] views of a split qkv tensor, as in the model), in two
modes:

* eager: R back-to-back calls between two CUDA events, per-call time = elapsed / R. This is what a
  prefill (or an --enforce-eager decode) step sees, CPU launch overhead included when it dominates.
* graph: the R calls captured in one CUDA graph and replayed between two events: GPU time only, what
  a CUDA-graph decode step sees.

Each of --iters samples alternates torch and fused (so clock drift hits both alike); the median is
reported. Inputs are reused across calls, so they are L2-warm where they fit (as activations just
written by the previous op would be). Before timing, the fused output is compared to torch's and
the max abs difference and the fraction of differing elements are recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = {
    # name: hidden, intermediate, Hq, Hk, D, rope theta, rope scaling
    "llama-3.2-1b": dict(
        hidden=2048, inter=8192, hq=32, hk=8, d=64, theta=500000.0,
        scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192},
    ),
    "llama-3.1-8b": dict(
        hidden=4096, inter=14336, hq=32, hk=8, d=128, theta=500000.0,
        scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192},
    ),
}
KERNELS = ["rms_norm", "rms_norm+residual", "rotary", "silu_and_mul"]
MAX_POS = 8192
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fused Triton kernels vs plain torch (CUDA event timing, median of N).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 256, 1024, 4096])
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--iters", type=int, default=30, help="timed samples per case (median reported)")
    p.add_argument("--reps", type=int, default=20, help="calls per sample (per-call time = sample / reps)")
    p.add_argument("--warmup", type=int, default=5, help="untimed samples before timing")
    p.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the torch version")
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- cases


def build_case(kernel: str, cfg: dict, t: int, dtype: torch.dtype, tf, dev: str = "cuda") -> dict:
    """Inputs plus torch / fused callables over the same tensors, and the ideal bytes moved."""
    from albireo.layers.norm import RMSNorm
    from albireo.layers.rotary import RotaryEmbedding

    esize = torch.finfo(dtype).bits // 8
    if kernel.startswith("rms_norm"):
        h = cfg["hidden"]
        layer = RMSNorm(h, 1e-5).to(dev)
        with torch.no_grad():
            layer.weight.copy_(1.0 + 0.1 * torch.randn(h, device=dev))
        layer = layer.to(dtype)
        x = torch.randn(t, h, device=dev, dtype=dtype)
        if kernel == "rms_norm":
            return dict(
                torch_fn=lambda: layer(x),
                fused_fn=lambda: tf.rms_norm(x, layer.weight, layer.eps),
                check=lambda: _diff(tf.rms_norm(x, layer.weight, layer.eps), layer(x)),
                bytes=(2 * t * h + h) * esize,
            )
        # The fused kernel writes the new residual in place; repeated calls keep adding x to it,
        # which changes values but not the work. The torch version allocates x + residual each call.
        residual = torch.randn(t, h, device=dev, dtype=dtype)

        def check():
            want_out, want_res = layer(x, residual.clone())
            out, new_res = tf.rms_norm(x, layer.weight, layer.eps, residual.clone())
            return _diff(torch.cat([out, new_res]), torch.cat([want_out, want_res]))

        return dict(
            torch_fn=lambda: layer(x, residual),
            fused_fn=lambda: tf.rms_norm(x, layer.weight, layer.eps, residual),
            check=check,
            bytes=(4 * t * h + h) * esize,
        )
    if kernel == "rotary":
        hq, hk, d = cfg["hq"], cfg["hk"], cfg["d"]
        rope = RotaryEmbedding(d, MAX_POS, cfg["theta"], cfg["scaling"]).to(dev)
        qkv = torch.randn(t, (hq + 2 * hk) * d, device=dev, dtype=dtype)
        q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q, k = q.view(t, hq, d), k.view(t, hk, d)
        positions = torch.randint(0, MAX_POS, (t,), device=dev)

        def check():
            want = rope(positions, q.clone(), k.clone())
            got = tf.apply_rotary(positions, q.clone(), k.clone(), rope.cos, rope.sin)
            return _diff(torch.cat([got[0].flatten(), got[1].flatten()]), torch.cat([w.flatten() for w in want]))

        # The fused version rotates q and k in place (repeatedly, while timing: same work).
        return dict(
            torch_fn=lambda: rope(positions, q, k),
            fused_fn=lambda: tf.apply_rotary(positions, q, k, rope.cos, rope.sin),
            check=check,
            bytes=2 * t * (hq + hk) * d * esize + t * d * 4 + t * 8,
        )
    if kernel == "silu_and_mul":
        i = cfg["inter"]
        x = torch.randn(t, 2 * i, device=dev, dtype=dtype)

        def torch_fn():
            gate, up = x.chunk(2, dim=-1)  # as LlamaMLP.forward
            return F.silu(gate) * up

        return dict(
            torch_fn=torch_fn,
            fused_fn=lambda: tf.silu_and_mul(x),
            check=lambda: _diff(tf.silu_and_mul(x), torch_fn()),
            bytes=3 * t * i * esize,
        )
    raise ValueError(kernel)


def _diff(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    a, e = actual.float(), expected.float()
    return {
        "max_abs_diff": (a - e).abs().max().item() if a.numel() else 0.0,
        "frac_differ": (actual != expected).float().mean().item() if a.numel() else 0.0,
    }


# ----------------------------------------------------------------------------------- timing


class Timer:
    """Per-call milliseconds of fn in one mode: one sample = `reps` calls between two events."""

    def __init__(self, fn, mode: str, reps: int) -> None:
        self.reps = reps
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        fn()  # compile / autotune / allocate before anything is timed or captured
        torch.cuda.synchronize()
        if mode == "graph":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for _ in range(reps):
                    fn()
            torch.cuda.synchronize()
            self.body = self.graph.replay
        else:
            def body():
                for _ in range(reps):
                    fn()

            self.body = body

    def sample(self) -> float:
        self.start.record()
        self.body()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / self.reps


def time_pair(fns: dict, mode: str, args) -> dict:
    """Median per-call microseconds for each named fn, samples interleaved."""
    timers = {name: Timer(fn, mode, args.reps) for name, fn in fns.items()}
    for _ in range(args.warmup):
        for timer in timers.values():
            timer.sample()
    samples = {name: [] for name in fns}
    for _ in range(args.iters):
        for name, timer in timers.items():
            samples[name].append(timer.sample())
    out = {}
    for name, vals in samples.items():
        out[name] = {
            "median_us": 1000 * statistics.median(vals),
            "min_us": 1000 * min(vals),
            "max_us": 1000 * max(vals),
        }
    del timers
    torch.cuda.synchronize()
    return out


# ----------------------------------------------------------------------------------- main


def environment() -> dict:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py times CUDA kernels and needs a CUDA GPU; none is available here.", file=sys.stderr)
        return 2
    from albireo.kernels import triton_fused as tf

    dtype = DTYPES[args.dtype]
    env = environment()
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}  {env['date']}")
    print(f"# dtype {args.dtype}, median of {args.iters} samples x {args.reps} calls, warmup {args.warmup}")
    results = []
    variants = ["torch", "fused"] + (["compiled"] if args.compile else [])
    header = f"{'model':<13} {'kernel':<18} {'T':>5} {'mode':<6}" + "".join(f" {v + ' us':>11}" for v in variants)
    header += f" {'speedup':>8} {'fused GB/s':>10} {'max|diff|':>10} {'differ':>7}"
    print(header)
    print("-" * len(header))
    for model in args.models:
        cfg = MODELS[model]
        for kernel in args.kernels:
            for t in args.tokens:
                torch.manual_seed(0)
                case = build_case(kernel, cfg, t, dtype, tf)
                check = case["check"]()
                fns = {"torch": case["torch_fn"], "fused": case["fused_fn"]}
                if args.compile:
                    fns["compiled"] = torch.compile(case["torch_fn"], dynamic=False)
                for mode in args.modes:
                    try:
                        timing = time_pair(fns, mode, args)
                        error = None
                    except Exception as e:  # e.g. a torch.compile failure: report it, keep going
                        timing, error = {}, f"{type(e).__name__}: {e}"
                    row = {
                        "model": model, "kernel": kernel, "tokens": t, "mode": mode, "dtype": args.dtype,
                        "bytes": case["bytes"], **check, "timing": timing,
                    }
                    if error:
                        row["error"] = error
                        print(f"{model:<13} {kernel:<18} {t:>5} {mode:<6} ERROR {error}")
                        results.append(row)
                        continue
                    torch_us, fused_us = timing["torch"]["median_us"], timing["fused"]["median_us"]
                    row["speedup"] = torch_us / fused_us
                    row["fused_gbps"] = case["bytes"] / (fused_us * 1e-6) / 1e9
                    results.append(row)
                    line = f"{model:<13} {kernel:<18} {t:>5} {mode:<6}"
                    line += "".join(f" {timing[v]['median_us']:>11.2f}" for v in variants)
                    line += f" {row['speedup']:>7.2f}x {row['fused_gbps']:>10.0f}"
                    line += f" {check['max_abs_diff']:>10.2e} {check['frac_differ']:>6.2%}"
                    print(line, flush=True)
                del case, fns
                torch.cuda.empty_cache()

    print("\n# slowest speedup of fused over torch, per kernel and mode (< 1: torch wins somewhere)")
    for kernel in args.kernels:
        for mode in args.modes:
            rows = [r for r in results if r["kernel"] == kernel and r["mode"] == mode and "speedup" in r]
            if rows:
                worst = min(rows, key=lambda r: r["speedup"])
                print(f"{kernel:<18} {mode:<6} min {worst['speedup']:.2f}x "
                      f"({worst['model']}, T={worst['tokens']}), max {max(r['speedup'] for r in rows):.2f}x")

    if args.out:
        record = {
            "benchmark": "fused_kernels",
            **env,
            "args": vars(args),
            "notes": "per-call microseconds; eager = back-to-back calls, graph = CUDA graph replay; "
            "inputs reused across calls (L2-warm where they fit); bytes = ideal bytes moved",
            "results": results,
        }
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
