"""Time a decode step's linear layers at small batch: cuBLAS (F.linear) against the Triton GEMV.

    python bench/decode_gemm.py --out benchmarks/results/decode-gemm-h100.json

Shapes are one Llama-3.1-8B layer's projections (TP=1 and TP=2) and its LM head. Each timing is
a CUDA graph of 40 calls cycling through enough copies of the weight to overflow L2, so every call
streams its weight from device memory. The ceiling is a large device-to-device copy.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from albireo.bench.record import device_name, git_commit, graph_us, weight_copies
from albireo.kernels.triton_fused import silu_and_mul
from albireo.kernels.triton_gemv import CONFIGS, gemv

SHAPES = {  # name: (N, K, silu_mul: the GEMV reads a [gate | up] row of 2K and applies SiLU-and-mul)
    "qkv": (6144, 4096, False),
    "o_proj": (4096, 4096, False),
    "gate_up": (28672, 4096, False),
    "down": (4096, 14336, False),
    "down_silu": (4096, 14336, True),
    "lm_head": (128256, 4096, False),
    "qkv_tp2": (3072, 4096, False),
    "o_proj_tp2": (4096, 2048, False),
    "gate_up_tp2": (14336, 4096, False),
    "down_tp2": (4096, 7168, False),
    "down_silu_tp2": (4096, 7168, True),
}
CALLS = 40
REPLAYS = 5


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="1,2,4")
    args = parser.parse_args()
    torch.manual_seed(0)
    record = {"device": device_name(), "commit": git_commit(), "copy_tb_s": copy_bandwidth(), "shapes": {}}
    print(f"{record['device']}: device-to-device copy {record['copy_tb_s']:.2f} TB/s (read + write)")
    for name, (n, k, silu) in SHAPES.items():
        weights = weight_copies(n, k)
        copies = len(weights)
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
            act = silu_and_mul(x) if silu else x
            expect = F.linear(act.float(), weights[0].float())
            got = gemv(x, weights[0], silu)
            err = ((got.float() - expect).abs().max() / expect.abs().max()).item()
            # cuBLAS's side pays for its separate activation kernel too.
            row = {"rel_err": err, "cublas_us": graph_us(
                lambda: [F.linear(silu_and_mul(x) if silu else x, weights[i % copies]) for i in range(CALLS)],
                CALLS, REPLAYS)}
            row["gemv_default_us"] = graph_us(
                lambda: [gemv(x, weights[i % copies], silu) for i in range(CALLS)], CALLS, REPLAYS)
            best = None
            for config in CONFIGS:
                us = graph_us(lambda: [gemv(x, weights[i % copies], silu, config) for i in range(CALLS)],
                              CALLS, REPLAYS)
                row[f"gemv_{'_'.join(map(str, config))}_us"] = us
                if best is None or us < best[1]:
                    best = (config, us)
            row["best_gemv"], row["best_gemv_us"] = list(best[0]), best[1]
            gbytes = n * k * 2 / 1e9
            row["cublas_tb_s"], row["gemv_tb_s"] = gbytes / row["cublas_us"] * 1e3, gbytes / best[1] * 1e3
            record["shapes"][f"{name}_m{m}"] = row
            print(f"{name:12s} m={m} N={n:6d} K={k:5d}  cuBLAS {row['cublas_us']:7.1f} us ({row['cublas_tb_s']:.2f} TB/s)"
                  f"  gemv {best[1]:7.1f} us ({row['gemv_tb_s']:.2f} TB/s) {best[0]}, default {row['gemv_default_us']:.1f} us"
                  f"  err {err:.1e}", flush=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
