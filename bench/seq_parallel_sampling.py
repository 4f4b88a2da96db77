"""Sampling time and logits traffic per step: all-gather sampling vs sequence-parallel sampling.

Spawns t ranks (gloo on CPU, nccl on GPUs); each holds a [B, V/t] logits shard as the LM head
leaves it, then (a) all-gathers [B, V] and samples all B rows, or (b) all-to-alls to [B/t, V] and
samples its rows, then all-gathers the B token ids. With --plain the rows sample with temperature
alone (no top-p), which on GPUs also times (c) vocab-parallel Gumbel sampling: each rank draws over
its shard and only every row's best (score, column) per chunk is all-gathered. Prints a table and
writes JSON.
"""

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from albireo.bench.ranks import hand_back, run_ranks
from albireo.distributed import parallel_state as ps
from albireo.kernels.triton_sampling import chunks_for
from albireo.sampling.sampler import Sampler, SamplingMetadata, SamplingRow
from albireo.sampling.seq_parallel import seq_parallel_sample
from albireo.sampling_params import SamplingParams


def _bench(rank, world, port, queue, device_type, batch, vocabs, iters, plain):
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps.set_tensor_parallel_group(dist.group.WORLD)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    sampler = Sampler()
    top_p = 1.0 if plain else 0.95
    rows = [SamplingRow(SamplingParams(temperature=1.0, top_p=top_p, seed=i), [], [], []) for i in range(batch)]
    results = []
    for vocab in vocabs:
        shard = -(-vocab // world)
        local = torch.randn(batch, shard, device=device)

        def all_gather_path():
            full = ps.tp_all_gather(local, dim=-1)[:, :vocab]
            return sampler(full, SamplingMetadata.build(rows, vocab, device)).sampled_token_ids

        def seq_parallel_path():
            return seq_parallel_sample(sampler, local, rows, vocab).sampled_token_ids

        metadata = SamplingMetadata.build(rows, vocab, device)

        def vocab_parallel_path():
            return seq_parallel_sample(sampler, local, rows, vocab, metadata).sampled_token_ids

        paths = [("all_gather", all_gather_path), ("seq_parallel", seq_parallel_path)]
        if metadata.fused_alone:
            paths.append(("vocab_parallel", vocab_parallel_path))
        for name, fn in paths:
            times = []
            for i in range(iters + 2):
                dist.barrier()
                if device_type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                if device_type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= 2:
                    times.append(time.perf_counter() - start)
            received = batch * vocab * 4 * (world - 1) / world
            if name == "seq_parallel":
                received = received / world + batch * 8 * (world - 1) / world
            if name == "vocab_parallel":
                received = 2 * batch * chunks_for(batch, shard) * 4 * (world - 1)
            results.append({"vocab": vocab, "path": name, "ms": statistics.median(times) * 1e3,
                            "bytes_received_per_rank": int(received)})
    hand_back(queue, rank, results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--plain", action="store_true", help="temperature alone (no top-p): adds the vocab-parallel path")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    record = {"device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu", "batch": args.batch, "plain": args.plain,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "runs": []}
    print(f"{'tp':>3} {'vocab':>7} {'path':>13} {'ms/step':>9} {'MB recv/rank':>13}")
    for world in args.tp:
        results = run_ranks(_bench, world, device_type, args.batch, args.vocab, args.iters, args.plain, timeout=None)
        for r in results:
            r["tp"] = world
            record["runs"].append(r)
            print(f"{world:>3} {r['vocab']:>7} {r['path']:>13} {r['ms']:>9.2f} {r['bytes_received_per_rank'] / 1e6:>13.2f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
