"""Latency of one all-reduce of a decode step's hidden states: NCCL vs peer memory (our push kernel
one-shot, alone and fused with the residual add and RMSNorm; past two ranks the same two-shot; and
PyTorch's two-shot).

A TP decode step of a Llama model makes two all-reduces per layer (after o_proj and down_proj),
each of batch x hidden bf16 values. This times them the way the engine runs them: 64 back to back
in one captured CUDA graph (an 8B model's step), replayed; checks that each path sums exactly as
NCCL does; prints a table and writes a record.
    python bench/allreduce.py --tp 2 4 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.ranks import hand_back, run_ranks
from albireo.bench.record import graph_us, write_record
from albireo.distributed.symm_all_reduce import MAX_BYTES, SymmMemAllReduce
from albireo.layers.norm import RMSNorm

CALLS_PER_STEP = 64
BATCHES = (1, 8, 32, 64, 128, 256, 512, 1024)


def _rank(rank: int, world: int, port: int, queue, hidden: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    symm = SymmMemAllReduce(dist.group.WORLD, device, torch.bfloat16)  # as the engine sets it up
    every_size = SymmMemAllReduce(dist.group.WORLD, device, torch.bfloat16, one_shot_bytes=MAX_BYTES)
    # Two-shot at every size (our kernel runs two-shot only past two ranks).
    two_shot_push = SymmMemAllReduce(dist.group.WORLD, device, torch.bfloat16, one_shot_bytes=0) if world > 2 else None
    norm = RMSNorm(hidden, 1e-5).to("cuda", torch.bfloat16)
    residual = torch.randn(max(BATCHES), hidden, device="cuda", dtype=torch.bfloat16)

    def push_then_norm(x):
        norm(every_size.push(x), residual[: x.shape[0]])

    def fused(symm: SymmMemAllReduce):
        return lambda x: symm.push(x, residual[: x.shape[0]], norm.weight, norm.eps)

    # "routed": the engine's unfused all-reduce (one-shot or two-shot by size, as tp_all_reduce picks).
    paths = {"nccl": dist.all_reduce, "push": every_size.push, "two_shot": symm.two_shot, "routed": symm,
             "push_then_norm": push_then_norm, "push_norm": fused(every_size)}
    if two_shot_push is not None:
        paths["push2"] = two_shot_push.push
        paths["push2_norm"] = fused(two_shot_push)
    results = {}
    for batch in BATCHES:
        torch.manual_seed(batch * 10 + rank)
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
        row = {"bytes": x.numel() * x.element_size()}
        expected = x.clone()
        dist.all_reduce(expected)
        for name, fn in paths.items():
            if name in ("nccl", "push", "two_shot", "routed", "push2"):
                got = x.clone()
                fn(got)
                row[f"{name}_max_abs_diff"] = (got.float() - expected.float()).abs().max().item()
            timed = x.clone()
            row[f"{name}_us"] = graph_us(lambda: [fn(timed) for _ in range(CALLS_PER_STEP)], CALLS_PER_STEP)
        results[batch] = row
        if rank == 0:
            print(f"tp={world} batch={batch:5d} ({row['bytes'] / 1024:7.1f} KiB) us per call in a graph: "
                  + ", ".join(f"{n} {row[n + '_us']:6.1f}" for n in paths if n + "_us" in row)
                  + "; max diff to nccl: "
                  + ", ".join(f"{n} {row[n + '_max_abs_diff']:.3g}" for n in paths if n + "_max_abs_diff" in row),
                  flush=True)
    hand_back(queue, rank, results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, nargs="+", default=[2])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    record = {"workload": "allreduce", "model": f"hidden{args.hidden}-bf16", "calls_per_step": CALLS_PER_STEP,
              "by_tp": {}}
    for world in args.tp:
        if world > torch.cuda.device_count():
            print(f"tp={world}: only {torch.cuda.device_count()} GPUs, skipped")
            continue
        record["by_tp"][world] = run_ranks(_rank, world, args.hidden)
    record["tp"] = max(record["by_tp"], default=1)
    print(f"record: {write_record(record, args.out)}")


if __name__ == "__main__":
    main()
