"""Time W2's linear layers under torch's two cuBLAS entry points, cuBLAS and cuBLASLt, on one GPU,
and through cuBLAS as the transposed product W x^T ([N, M] out), for which its heuristics pick
tiles along the other dimension.

    python bench/blas_backends.py --out benchmarks/results/blas-backends-h200.json

At TP=2 the decode step's gate/up GEMM (512 x 14336 x 4096) runs 224 tiles of 256 x 128 on 132 SMs,
so its second wave is 70% full; cuBLASLt's heuristics may choose another kernel for the same shape.
At TP=2 the decode GEMMs of 512 rows ran 5-27% below TP=1's TF/s (blas-backends-h200-be2ebbd.json),
about 18 us a layer: the transposed product is the first thing to try for them.
Each timing is a CUDA graph of calls cycling through enough weight copies to overflow L2.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from albireo.bench.record import device_name, git_commit, graph_us, weight_copies

SHAPES = {  # name: (N, K) of one Llama-3.1-8B layer's projections at TP=1 and TP=2
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "qkv_tp2": (3072, 4096),
    "o_proj_tp2": (4096, 2048),
    "gate_up_tp2": (14336, 4096),
    "down_tp2": (4096, 7168),
}
# name: (torch's BLAS library, the product x W^T as [M, N]; the transposed one is a view of W x^T)
VARIANTS = {
    "cublas": ("cublas", F.linear),
    "cublaslt": ("cublaslt", F.linear),
    "transposed": ("cublas", lambda x, w: torch.mm(w, x.t()).t()),
}


def kernel_name(call) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return ",".join(names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="256,512,16384")
    args = parser.parse_args()
    torch.manual_seed(0)
    record = {"benchmark": "blas_backends", "device": device_name(), "commit": git_commit(), "shapes": {}}
    for name, (n, k) in SHAPES.items():
        weights = weight_copies(n, k)
        copies = len(weights)
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            calls = 40 if m <= 512 else 8
            row, outputs = {}, {}
            for variant, (library, product) in VARIANTS.items():
                torch.backends.cuda.preferred_blas_library(library)
                outputs[variant] = product(x, weights[0])
                row[f"{variant}_us"] = graph_us(lambda: [product(x, weights[i % copies]) for i in range(calls)],
                                                calls, 5)
                row[f"{variant}_tflops"] = 2 * m * n * k / row[f"{variant}_us"] / 1e6
                row[f"{variant}_kernel"] = kernel_name(lambda: product(x, weights[0]))
            torch.backends.cuda.preferred_blas_library("cublas")
            row["max_abs_diff"] = max((outputs[v].float() - outputs["cublas"].float()).abs().max().item()
                                      for v in VARIANTS)
            record["shapes"][f"{name}_m{m}"] = row
            print(f"{name:12s} m={m:5d} N={n:6d} K={k:5d}  cuBLAS {row['cublas_us']:8.1f} us "
                  f"({row['cublas_tflops']:4.0f} TF/s)  cuBLASLt {row['cublaslt_us']:8.1f} us "
                  f"({row['cublaslt_tflops']:4.0f} TF/s)  W x^T {row['transposed_us']:8.1f} us "
                  f"({row['transposed_tflops']:4.0f} TF/s)  diff {row['max_abs_diff']:.1e}  "
                  f"{row['cublas_kernel'][:40]} / {row['cublaslt_kernel'][:40]}", flush=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
