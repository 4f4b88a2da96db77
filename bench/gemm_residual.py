"""From how many rows a TP=1 row-parallel layer should add its product into the residual inside
the cuBLAS matmul (beta = 1) rather than in the norm after it: both ways timed in CUDA graphs for the
o_proj and down_proj shapes of llama-3.2-1b and llama-3.1-8b.

    python bench/gemm_residual.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.record import device_name, git_commit, graph_us
from albireo.kernels.triton_fused import rms_norm

# name: (input features, hidden)
SHAPES = {
    "llama-3.2-1b o_proj": (2048, 2048),
    "llama-3.2-1b down_proj": (8192, 2048),
    "llama-3.1-8b o_proj": (4096, 4096),
    "llama-3.1-8b down_proj": (14336, 4096),
}
ROWS = (64, 256, 512, 1024, 2048, 4096, 16384)
CALLS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    record = {"benchmark": "gemm_residual", "device": device_name(), "commit": git_commit(),
              "torch": torch.__version__, "calls_per_graph": CALLS, "results": []}
    for name, (inner, hidden) in SHAPES.items():
        w = torch.randn(hidden, inner, device=dev, dtype=bf16) / inner**0.5
        norm_w = torch.ones(hidden, device=dev, dtype=bf16)
        for rows in ROWS:
            x = torch.randn(rows, inner, device=dev, dtype=bf16)
            residual = torch.randn(rows, hidden, device=dev, dtype=bf16)

            def in_norm() -> None:
                for _ in range(CALLS):
                    rms_norm(F.linear(x, w), norm_w, 1e-5, residual)

            def in_matmul() -> None:
                for _ in range(CALLS):
                    residual.addmm_(x, w.t())
                    rms_norm(residual, norm_w, 1e-5)

            entry = {"shape": name, "rows": rows, "add_in_norm_us": graph_us(in_norm, CALLS),
                     "add_in_matmul_us": graph_us(in_matmul, CALLS)}
            record["results"].append(entry)
            print(f"{name:24s} rows {rows:6d}: add in norm {entry['add_in_norm_us']:8.1f} us, "
                  f"in matmul {entry['add_in_matmul_us']:8.1f} us", flush=True)
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
