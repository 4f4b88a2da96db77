"""What a prefill step's row-parallel layer costs at TP=2: its matmul, then the all-reduce of its
output, by NCCL or by the copy engines overlapped with the matmul in row chunks.

A 16k-token prefill step of an 8B model at TP=2 all-reduces 64 tensors of 16384 x 4096 bf16
(128 MiB); through NCCL they took 37 of the step's ~222 ms on two H200s. This times, in two
processes, for each row count: the matmul alone (down_proj's shape); NCCL's all-reduce alone; the
two in turn; the same matmul in row chunks with NCCL all-reducing each chunk while the next
multiplies; and `CopyEngineAllReduce.linear` at several chunk counts (albireo/distributed/
copy_engine_all_reduce.py), alone (the engine adds the peer's part in the norm after it) and
with the add, checked against NCCL's sum. Run it under NCCL_* settings to compare.
Earlier results: NCCL ran at 274-283 GB/s whatever its protocol or channels, and its chunked
overlap saved 0.12 of 1.70 ms and nothing in W2 (nccl-prefill-allreduce-h200x2-ad9cfcd.txt).
    python bench/prefill_allreduce.py [--rows 2048 4096 8192 16384] [--chunks 1 2 4 8]
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _ms(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _rank(rank: int, port: int, rows_list: list[int], chunk_counts: list[int], hidden: int, inner: int) -> None:
    from albireo.distributed.copy_engine_all_reduce import CopyEngineAllReduce

    torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    max_rows = max(rows_list)
    ce = {c: CopyEngineAllReduce(dist.group.WORLD, torch.device("cuda", rank), torch.bfloat16,
                                 max_rows * hidden * 2, min_bytes=1, chunks=c) for c in chunk_counts}
    settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")) or "defaults"
    for rows in rows_list:
        torch.manual_seed(rank * 1000 + rows)
        x = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(hidden, inner, device="cuda", dtype=torch.bfloat16) / inner**0.5
        y = torch.empty(rows, hidden, device="cuda", dtype=torch.bfloat16)

        def matmul() -> None:
            torch.matmul(x, w.t(), out=y)

        def all_reduce() -> None:
            dist.all_reduce(y)

        def serial() -> None:
            matmul()
            all_reduce()

        def nccl_chunked(chunks: int = 4) -> None:
            pending = []
            for i in range(chunks):
                lo, hi = rows * i // chunks, rows * (i + 1) // chunks
                torch.matmul(x[lo:hi], w.t(), out=y[lo:hi])
                pending.append(dist.all_reduce(y[lo:hi], async_op=True))
            for work in pending:
                work.wait()

        times = {"matmul": _ms(matmul), "nccl": _ms(all_reduce), "matmul+nccl": _ms(serial),
                 "nccl 4 chunks": _ms(nccl_chunked)}
        serial()
        expected = y.clone()
        worst = 0.0
        for c, op in ce.items():
            times[f"ce {c} chunks"] = _ms(lambda: op.linear(x, w))
            times[f"ce {c} chunks + add"] = _ms(lambda: torch.add(*op.linear(x, w)))
            worst = max(worst, (torch.add(*op.linear(x, w)) - expected).abs().max().item())
        if rank == 0:
            gbps = rows * hidden * 2 / times["nccl"] / 1e6
            line = ", ".join(f"{k} {v:.3f}" for k, v in times.items())
            print(f"[{settings}] rows {rows} ({rows * hidden * 2 / 2**20:.0f} MiB, NCCL {gbps:.0f} GB/s) ms: {line}; "
                  f"copy-engine sum vs NCCL max |diff| {worst:g}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inner", type=int, default=7168, help="down_proj's input features per rank at TP=2")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, args.rows, args.chunks, args.hidden, args.inner), nprocs=2)


if __name__ == "__main__":
    main()
