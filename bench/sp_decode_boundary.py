"""Would a sequence-parallel layer boundary beat today's GEMM + one-shot all-reduce in a TP=2 decode
step? Two ranks, llama-3.1-8b's shapes at TP=2, times in CUDA graphs (CALLS boundaries a graph).

Today a row-parallel GEMM (o_proj, down_proj) makes every rank's partial sums of all R rows, the
one-shot kernel pushes them to the peer and sums them with the residual add and RMSNorm, and the
next column-parallel GEMM (gate_up, qkv) reads the R normalized rows:
    today:  GEMM1(R) -> push all-reduce + norm (R rows) -> GEMM2(R)
Sequence-parallel, each rank would own half the rows between the two GEMMs: GEMM1 writes the peer's
half straight into the peer's memory (cuBLAS with an output over NVLink, the reduce-scatter done by
the GEMM), then its own half; the sum, residual and norm run on R/2 rows, whose results go to the
peer (the all-gather); GEMM2 runs on the two halves. Stood in for here by
    sp:     GEMM1(R/2 -> peer) -> GEMM1(R/2 -> local) -> push all-reduce + norm (R/2 rows) -> GEMM2(R/2) x 2
The all-reduce of R/2 rows moves the all-gather's bytes and does the half-size norm, but not the
wait for the GEMM's remote writes (a flag, a few us more): `sp` is a lower bound of that design.
Each GEMM and all-reduce is also timed alone, and the GEMM's remote output is checked on the peer.
    python bench/sp_decode_boundary.py [--rows 256 512 1024] [--out FILE.json]
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
# (K, N) of the row-parallel GEMM before each boundary and of the column-parallel one after it.
BOUNDARIES = {
    "o_proj -> gate_up": ((2048, HIDDEN), (HIDDEN, 14336)),
    "down_proj -> qkv": ((7168, HIDDEN), (HIDDEN, 3072)),
}


def _rank(rank: int, world: int, port: int, queue, rows_list: list[int]) -> None:
    import torch.distributed._symmetric_memory as symm_mem

    from albireo.distributed.symm_all_reduce import SymmMemAllReduce
    from albireo.kernels.triton_all_reduce import push_all_reduce

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    peer = 1 - rank
    symm = SymmMemAllReduce(dist.group.WORLD, dev, torch.bfloat16)
    landing = symm_mem.empty(max(rows_list) // 2 * HIDDEN, dtype=torch.bfloat16, device=dev)
    handle = symm_mem.rendezvous(landing, dist.group.WORLD)
    norm_weight = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)
    results = {}
    for rows in rows_list:
        half = rows // 2
        remote = handle.get_buffer(peer, (half, HIDDEN), torch.bfloat16)
        for name, ((k1, n1), (k2, n2)) in BOUNDARIES.items():
            gen = torch.Generator(device=dev).manual_seed(rows + k1)  # the same inputs on both ranks
            x = torch.randn(rows, k1, device=dev, dtype=torch.bfloat16, generator=gen)
            w1 = torch.randn(n1, k1, device=dev, dtype=torch.bfloat16, generator=gen) / k1**0.5
            w2 = torch.randn(n2, k2, device=dev, dtype=torch.bfloat16, generator=gen) / k2**0.5
            residual = torch.randn(rows, HIDDEN, device=dev, dtype=torch.bfloat16, generator=gen)
            partial = torch.empty(rows, HIDDEN, device=dev, dtype=torch.bfloat16)
            after = torch.empty(rows, n2, device=dev, dtype=torch.bfloat16)

            def all_reduce(n: int) -> torch.Tensor:
                out, _ = push_all_reduce(partial[:n], symm.peers, symm.rounds, symm.push_target.slot_numel, rank,
                                         residual=residual[:n], weight=norm_weight, eps=1e-5)
                return out

            def gemm1_full() -> None:
                torch.matmul(x, w1.t(), out=partial)

            def gemm1_half_local() -> None:
                torch.matmul(x[:half], w1.t(), out=partial[:half])

            def gemm1_half_remote() -> None:
                torch.matmul(x[half:], w1.t(), out=remote)

            def gemm2_full() -> None:
                torch.matmul(partial, w2.t(), out=after)

            def gemm2_half() -> None:
                torch.matmul(partial[:half], w2.t(), out=after[:half])

            def today() -> None:
                gemm1_full()
                normed = all_reduce(rows)
                torch.matmul(normed, w2.t(), out=after)

            def sp() -> None:
                gemm1_half_remote()
                gemm1_half_local()
                normed = all_reduce(half)
                torch.matmul(normed, w2.t(), out=after[:half])
                torch.matmul(normed, w2.t(), out=after[half:])

            def repeat(fn):
                return lambda: [fn() for _ in range(CALLS)]

            times = {
                "today": graph_us(repeat(today), CALLS),
                "sp": graph_us(repeat(sp), CALLS),
                "gemm1 R": graph_us(repeat(gemm1_full), CALLS),
                "gemm1 R/2 local": graph_us(repeat(gemm1_half_local), CALLS),
                "gemm1 R/2 to peer": graph_us(repeat(gemm1_half_remote), CALLS),
                "all-reduce+norm R": graph_us(repeat(lambda: all_reduce(rows)), CALLS),
                "all-reduce+norm R/2": graph_us(repeat(lambda: all_reduce(half)), CALLS),
                "gemm2 R": graph_us(repeat(gemm2_full), CALLS),
                "gemm2 R/2": graph_us(repeat(gemm2_half), CALLS),
            }
            # The peer wrote its x[half:] @ w1^T into this rank's landing buffer; the inputs are equal.
            gemm1_half_remote()
            torch.cuda.synchronize()
            dist.barrier()
            expected = torch.matmul(x[half:], w1.t())
            landed = landing[: half * HIDDEN].view(half, HIDDEN)
            times["remote output max |diff|"] = (landed - expected).abs().max().item()
            file_times(results, f"R={rows} {name}", times, rank)
    hand_back(queue, rank, results)


def main() -> None:
    two_rank_rows_benchmark("sp_decode_boundary", __doc__, _rank, "us per boundary", CALLS, 300)


if __name__ == "__main__":
    main()
