"""Host time of a GEMM's first call at a new row count against its second call, on one CUDA GPU.

cuBLAS prepares a kernel for each new problem shape on the host; this shows what that costs for
the LM head's shape (rows x hidden) @ (hidden x vocab) at the row counts a mixed step may sample.

    python bench/gemm_first_call.py --hidden 2048 --vocab 128256
"""

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--rows", type=int, nargs="+", default=[16, 17, 100, 333, 500, 501, 777, 1000])
    args = p.parse_args()
    weight = torch.randn(args.vocab, args.hidden, dtype=torch.bfloat16, device="cuda")
    for rows in args.rows:
        x = torch.randn(rows, args.hidden, dtype=torch.bfloat16, device="cuda")
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        print(f"rows {rows:5d}: first call {times[0]:8.2f} ms on the host, second {times[1]:6.2f} ms")


if __name__ == "__main__":
    main()
