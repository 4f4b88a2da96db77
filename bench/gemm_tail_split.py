"""Does splitting a decode matmul by output features shorten its last, part-empty wave of tiles?

At 512 rows TP=2's gate_up (14336 features) takes 88.8 us a layer on an H100 against 77.1 for half
of TP=1's (session 21's profile): with cuBLAS's 256x128 tiles it makes 224 tiles, 1.7 waves on 132
SMs, and the second wave leaves SMs idle. Split into a first matmul of whole waves and a second of
the rest, cuBLAS picks the second's tiles for its own, smaller shape, which may fill the SMs better.
Each split writes its features into its columns of one output (cuBLAS's leading dimension), as the
engine's [gate | up] product needs. Timed in CUDA graphs of CALLS calls cycling through enough
weight copies to overflow L2; each split's largest difference from the whole matmul's product is
recorded (cuBLAS may sum a smaller shape in another order).
    python bench/gemm_tail_split.py [--rows 256 512 1024] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.record import device_name, git_commit, graph_us

CALLS = 8
SHAPES = {  # name: (output features, input features)
    "gate_up_tp1": (28672, 4096),
    "gate_up_tp2": (14336, 4096),
    "down_tp2": (4096, 7168),
    "qkv_tp2": (3072, 4096),
}
# Widths of the first matmul of a split; the second takes the rest.
FIRSTS = (2048, 4096, 6144, 8192, 8448, 10240, 12288, 16384, 16896, 24576)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev).manual_seed(0)
    results = {}
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(CALLS)]
        for rows in args.rows:
            x = torch.randn(rows, k, generator=gen, device=dev, dtype=torch.bfloat16)
            out = torch.empty(rows, n, device=dev, dtype=torch.bfloat16)

            def whole() -> None:
                for w in weights:
                    torch.matmul(x, w.t(), out=out)

            def split(first: int) -> None:
                for w in weights:
                    torch.matmul(x, w[:first].t(), out=out[:, :first])
                    torch.matmul(x, w[first:].t(), out=out[:, first:])

            times = {"whole": graph_us(whole, CALLS)}
            expected = x @ weights[-1].t()
            for first in FIRSTS:
                if first >= n:
                    continue
                times[f"split {first}"] = graph_us(lambda f=first: split(f), CALLS)
                split(first)
                times[f"split {first} max |diff|"] = (out.float() - expected.float()).abs().max().item()
            best = min((t, s) for s, t in times.items() if "diff" not in s)
            results[f"{name} R={rows}"] = times
            print(f"{name:12s} R={rows:5d} whole {times['whole']:7.1f} us, best {best[1]} {best[0]:7.1f}", flush=True)
    record = {"benchmark": "gemm_tail_split", "device": device_name(), "commit": git_commit(), "unit": "us per matmul",
              "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
