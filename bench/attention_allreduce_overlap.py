"""Can half a TP=2 decode batch's o_proj all-reduce hide behind the other half's attention?
Two ranks, llama-3.1-8b's shapes at TP=2 (16 query heads, 4 KV heads of 128 a rank), W2's decode
contexts (512-768 keys), times per layer in CUDA graphs (CALLS layers a graph).

Decode attention reads the KV cache at HBM speed and moves nothing over NVLink; the one-shot
all-reduce after o_proj moves 4 MiB over NVLink at 512 rows and does little else. Today they run one
after the other:
    today:   attention(R) -> o_proj(R) -> all-reduce + norm(R)
Split in two halves of rows, the first half's all-reduce can run on a second stream while the second
half's attention runs:
    overlap: attention(A) -> o_proj(A) -> [side stream: all-reduce + norm(A)]
             attention(B) -> o_proj(B) -> all-reduce + norm(B) -> join
    serial:  the same six launches on one stream (what splitting costs by itself)
Each half's all-reduce has its own exchange buffers, so the two never share a slot. The side
stream's all-reduce runs at most SIDE_PROGRAMS programs, so its waiting programs leave attention
most of the SMs. The overlapped sums are checked against today's.
    python bench/attention_allreduce_overlap.py [--rows 256 512 1024] [--side-programs 16 32 64] [--out FILE.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.ranks import file_times, hand_back, two_rank_rows_benchmark
from albireo.bench.record import graph_us

CALLS = 8
HIDDEN = 4096
Q_HEADS, KV_HEADS, HEAD_DIM = 16, 4, 128
PAGE = 16
SHORTEST, LONGEST = 512, 768


def _rank(rank: int, world: int, port: int, queue, rows_list: list[int], side_programs: list[int]) -> None:
    from albireo.distributed.symm_all_reduce import SymmMemAllReduce
    from albireo.kernels.triton_all_reduce import push_all_reduce
    from albireo.kernels.triton_attention import paged_attention

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    first, second = (SymmMemAllReduce(dist.group.WORLD, dev, torch.bfloat16) for _ in range(2))
    side = torch.cuda.Stream(device=dev, priority=-1)
    norm_weight = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)
    results = {}
    for rows in rows_list:
        half = rows // 2
        gen = torch.Generator(device=dev).manual_seed(rows + rank)  # each rank its own partial sums
        width = -(-LONGEST // PAGE)
        block_tables = torch.randperm(rows * width, device=dev, generator=gen).view(rows, width).to(torch.int32)
        k_cache, v_cache = (torch.randn(rows * width, PAGE, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16,
                                        generator=gen) for _ in range(2))
        seq_lens = torch.randint(SHORTEST, LONGEST + 1, (rows,), device=dev, generator=gen, dtype=torch.int32)
        q = torch.randn(rows, Q_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
        starts = torch.arange(rows + 1, device=dev, dtype=torch.int32)
        w_o = torch.randn(HIDDEN, Q_HEADS * HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen) / 45.0
        residual_in = torch.randn(rows, HIDDEN, device=dev, dtype=torch.bfloat16, generator=gen)
        attn = torch.empty(rows, Q_HEADS * HEAD_DIM, device=dev, dtype=torch.bfloat16)
        partial = torch.empty(rows, HIDDEN, device=dev, dtype=torch.bfloat16)
        residual = residual_in.clone()
        halves = (slice(0, half), slice(half, rows))

        def attention(s: slice) -> None:
            n = s.stop - s.start
            paged_attention(q[s], k_cache, v_cache, block_tables[s], starts[: n + 1], seq_lens[s], HEAD_DIM**-0.5, 1,
                            out=attn[s])

        def o_proj(s: slice) -> None:
            torch.matmul(attn[s], w_o.t(), out=partial[s])

        def all_reduce(s: slice, symm: SymmMemAllReduce, programs: int | None = None) -> torch.Tensor:
            out, _ = push_all_reduce(partial[s], symm.peers, symm.rounds, symm.push_target.slot_numel, rank,
                                     residual=residual[s], weight=norm_weight, eps=1e-5, max_programs=programs)
            return out

        def today() -> list[torch.Tensor]:
            everything = slice(0, rows)
            attention(everything)
            o_proj(everything)
            return [all_reduce(everything, first)]

        def serial() -> list[torch.Tensor]:
            outs = []
            for s, symm in zip(halves, (first, second)):
                attention(s)
                o_proj(s)
                outs.append(all_reduce(s, symm))
            return outs

        def overlap(programs: int) -> list[torch.Tensor]:
            main = torch.cuda.current_stream()
            attention(halves[0])
            o_proj(halves[0])
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out_a = all_reduce(halves[0], first, programs)
            attention(halves[1])
            o_proj(halves[1])
            out_b = all_reduce(halves[1], second)
            main.wait_stream(side)
            return [out_a, out_b]

        def repeat(fn):
            return lambda: [fn() for _ in range(CALLS)]

        def check(fn) -> float:
            """Max |difference| of fn's normalized rows from today's, from the same residual."""
            residual.copy_(residual_in)
            expected = torch.cat(today())
            residual.copy_(residual_in)
            got = torch.cat(fn())
            torch.cuda.synchronize()
            return (got - expected).abs().max().item()

        times = {
            "today": graph_us(repeat(today), CALLS),
            "serial": graph_us(repeat(serial), CALLS),
            "attention R": graph_us(repeat(lambda: attention(slice(0, rows))), CALLS),
            "attention R/2": graph_us(repeat(lambda: attention(halves[1])), CALLS),
            "o_proj R": graph_us(repeat(lambda: o_proj(slice(0, rows))), CALLS),
            "o_proj R/2": graph_us(repeat(lambda: o_proj(halves[1])), CALLS),
            "all-reduce+norm R": graph_us(repeat(lambda: all_reduce(slice(0, rows), first)), CALLS),
            "all-reduce+norm R/2": graph_us(repeat(lambda: all_reduce(halves[1], second)), CALLS),
            "serial max |diff|": check(serial),
        }
        for programs in side_programs:
            times[f"overlap side {programs}"] = graph_us(repeat(lambda p=programs: overlap(p)), CALLS)
            times[f"overlap side {programs} max |diff|"] = check(lambda p=programs: overlap(p))
        file_times(results, f"R={rows}", times, rank)
    hand_back(queue, rank, results)


def main() -> None:
    two_rank_rows_benchmark("attention_allreduce_overlap", __doc__, _rank, "us per layer", CALLS, 300,
                            ("--side-programs", [16, 32, 64, 264]))


if __name__ == "__main__":
    main()
