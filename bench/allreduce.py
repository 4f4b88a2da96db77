"""Latency of one NCCL all-reduce of a decode step's hidden states, eager and inside a CUDA graph.

A TP decode step of a Llama model makes two all-reduces per layer (after o_proj and down_proj),
each of batch x hidden bf16 values. This times them the way the engine runs them: 64 back to back
in one captured graph (an 8B model's step), replayed; and one by one, eagerly.
    python bench/allreduce.py --tp 2 4 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.record import write_record  # noqa: E402

CALLS_PER_STEP = 64
BATCHES = (1, 8, 64, 256, 512)


def _time_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _rank(rank: int, world: int, port: int, hidden: int, queue) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for batch in BATCHES:
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
        for _ in range(10):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        eager_us = _time_ms(lambda: dist.all_reduce(x), 200) * 1e3
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(CALLS_PER_STEP):
                dist.all_reduce(x)
        graph.replay()
        torch.cuda.synchronize()
        graph_us = _time_ms(graph.replay, 20) * 1e3 / CALLS_PER_STEP
        results[batch] = {"eager_us": eager_us, "graph_us": graph_us, "bytes": x.numel() * x.element_size()}
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, nargs="+", default=[2])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    record = {"workload": "allreduce", "model": f"hidden{args.hidden}", "calls_per_step": CALLS_PER_STEP,
              "by_tp": {}}
    for world in args.tp:
        if world > torch.cuda.device_count():
            print(f"tp={world}: only {torch.cuda.device_count()} GPUs, skipped")
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, world, port, args.hidden, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = queue.get(timeout=300)
        for p in procs:
            p.join()
        record["by_tp"][world] = results
        for batch, r in results.items():
            print(f"tp={world} batch={batch:4d} ({r['bytes'] / 1024:7.1f} KiB): eager {r['eager_us']:6.1f} us, "
                  f"in a graph {r['graph_us']:6.1f} us per all-reduce")
    record["tp"] = max(record["by_tp"], default=1)
    print(f"record: {write_record(record, args.out)}")


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
