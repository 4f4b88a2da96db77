"""Would data-parallel attention pay at TP=2? A decode layer of llama-3.1-8b's shapes timed three
ways on each of two GPUs, in CUDA graphs of CALLS layers (each with its own weights), W2's decode
contexts (512-768 keys):

    tp1: the whole layer on one GPU, as the engine runs it at TP=1 (the reference to halve):
         qkv(R) -> attention(R, 32 q / 8 KV heads) -> o_proj(R) + residual -> norm
         -> gate_up(R) -> silu -> down(R) -> add + norm
    tp:  today's TP=2 layer: half the heads and MLP columns, both exchanges all-reduces of R rows
         qkv(R, 1/2) -> attention(R, 16 / 4) -> o_proj(R, 1/2) -> all-reduce + add + norm(R)
         -> gate_up(R, 1/2) -> silu -> down(R, 1/2) -> all-reduce + add + norm(R)
    dp:  attention data-parallel: a rank holds whole attention weights and the whole KV of its
         own R/2 sequences; only the MLP is split by columns
         qkv(R/2) -> attention(R/2, 32 / 8) -> o_proj(R/2) -> add + norm + all-gather(R/2 -> R)
         -> gate_up(R, 1/2) -> silu -> down(R, 1/2) -> reduce-scatter + add + norm(R -> R/2)
    dp overlap: dp, with this rank's own rows through gate_up while the peer's cross NVLink
         (the all-gather on a side stream of at most SIDE_PROGRAMS programs)

An all-reduce of R rows sends each rank's R rows to its peer; an all-gather or a reduce-scatter
of R rows at two ranks sends R/2. So dp moves half of tp's bytes a layer, in as many exchanges.
Here the two exchanges of dp are timed with the one-shot push kernel with its add and norm on
R/2 rows, which sends and sums exactly what a reduce-scatter with its norm would (an all-gather
sends the same and sums nothing): a timing model, whose values are not dp's outputs. Rotary, the
KV-cache writes, the embedding and the LM head are left out of all three.
    python bench/dp_attention_layer.py [--rows 256 512 1024] [--out FILE.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.ranks import file_times, hand_back, two_rank_rows_benchmark
from albireo.bench.record import graph_us

CALLS = 4
HIDDEN, INTER = 4096, 14336
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PAGE = 16
SHORTEST, LONGEST = 512, 768
SIDE_PROGRAMS = 64
EPS = 1e-5


def _rank(rank: int, world: int, port: int, queue, rows_list: list[int]) -> None:
    from albireo.distributed.symm_all_reduce import SymmMemAllReduce
    from albireo.kernels.triton_all_reduce import push_all_reduce
    from albireo.kernels.triton_attention import paged_attention
    from albireo.kernels.triton_fused import rms_norm, silu_and_mul

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    symm = SymmMemAllReduce(dist.group.WORLD, dev, torch.bfloat16)
    side = torch.cuda.Stream(device=dev, priority=-1)
    norm_w = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)
    gen = torch.Generator(device=dev).manual_seed(rank)
    bf16 = dict(device=dev, dtype=torch.bfloat16)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, **bf16) * scale

    def layers(split_attention: int, split_mlp: int) -> list[dict[str, torch.Tensor]]:
        """CALLS layers' weights, attention's heads and the MLP's columns each split in that many."""
        q, kv, inter = Q_HEADS // split_attention, KV_HEADS // split_attention, INTER // split_mlp
        return [{"qkv": randn((q + 2 * kv) * HEAD_DIM, HIDDEN, scale=0.02), "o": randn(HIDDEN, q * HEAD_DIM, scale=0.02),
                 "gate_up": randn(2 * inter, HIDDEN, scale=0.02), "down": randn(HIDDEN, inter, scale=0.02)}
                for _ in range(CALLS)]

    weights = {"tp1": layers(1, 1), "tp": layers(2, 2), "dp": layers(1, 2)}

    def exchange(x: torch.Tensor, residual: torch.Tensor, programs: int | None = None) -> torch.Tensor:
        return push_all_reduce(x, symm.peers, symm.rounds, symm.push_target.slot_numel, rank, residual=residual,
                               weight=norm_w, eps=EPS, max_programs=programs)[0]

    results = {}
    for rows in rows_list:
        half = rows // 2
        width = -(-LONGEST // PAGE)

        def attention_inputs(seqs: int, kv_heads: int):
            tables = torch.randperm(seqs * width, device=dev, generator=gen).view(seqs, width).to(torch.int32)
            caches = [randn(seqs * width, PAGE, kv_heads, HEAD_DIM) for _ in range(2)]
            lens = torch.randint(SHORTEST, LONGEST + 1, (seqs,), device=dev, generator=gen, dtype=torch.int32)
            return tables, caches, lens, torch.arange(seqs + 1, device=dev, dtype=torch.int32)

        def attend(qkv: torch.Tensor, inputs, q_heads: int) -> torch.Tensor:
            tables, (k_cache, v_cache), lens, starts = inputs
            q = qkv[:, : q_heads * HEAD_DIM].view(-1, q_heads, HEAD_DIM)
            out = torch.empty(q.shape[0], q_heads * HEAD_DIM, **bf16)
            paged_attention(q, k_cache, v_cache, tables, starts, lens, HEAD_DIM**-0.5, 1, out=out)
            return out

        full_kv = attention_inputs(rows, KV_HEADS)
        half_heads_kv = attention_inputs(rows, KV_HEADS // 2)
        own_seqs_kv = attention_inputs(half, KV_HEADS)
        x_full, x_half = randn(rows, HIDDEN), randn(half, HIDDEN)
        residual_full, residual_half = randn(rows, HIDDEN), randn(half, HIDDEN)
        qkv_tp, qkv_dp = randn(rows, (Q_HEADS // 2 + KV_HEADS) * HEAD_DIM), randn(half, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM)
        gathered = randn(rows, HIDDEN)  # the all-gather's output in dp (the model's values are not computed)
        own, peer = slice(rank * half, (rank + 1) * half), slice((1 - rank) * half, (2 - rank) * half)

        def tp1() -> None:
            for w in weights["tp1"]:
                a = attend(x_full @ w["qkv"].t(), full_kv, Q_HEADS)
                residual_full.addmm_(a, w["o"].t())
                h = rms_norm(residual_full, norm_w, EPS)
                m = silu_and_mul(h @ w["gate_up"].t())
                rms_norm(m @ w["down"].t(), norm_w, EPS, residual_full)

        def tp() -> None:
            for w in weights["tp"]:
                a = attend(x_full @ w["qkv"].t(), half_heads_kv, Q_HEADS // 2)
                h = exchange(a @ w["o"].t(), residual_full)
                m = silu_and_mul(h @ w["gate_up"].t())
                exchange(m @ w["down"].t(), residual_full)

        def dp(overlap: bool) -> None:
            for w in weights["dp"]:
                a = attend(x_half @ w["qkv"].t(), own_seqs_kv, Q_HEADS)
                o = a @ w["o"].t()
                if overlap:
                    normed = rms_norm(o, norm_w, EPS, residual_half)[0]
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        exchange(o, residual_half, SIDE_PROGRAMS)  # the peer's rows on their way
                    gate_up = torch.empty(rows, w["gate_up"].shape[0], **bf16)
                    torch.matmul(normed, w["gate_up"].t(), out=gate_up[own])
                    torch.cuda.current_stream().wait_stream(side)
                    torch.matmul(gathered[peer], w["gate_up"].t(), out=gate_up[peer])
                else:
                    exchange(o, residual_half)
                    gate_up = gathered @ w["gate_up"].t()
                m = silu_and_mul(gate_up)
                down = m @ w["down"].t()
                exchange(down[own], residual_half)

        def per_layer(fn) -> float:
            return graph_us(fn, CALLS)

        times = {
            "tp1": per_layer(tp1),
            "tp": per_layer(tp),
            "dp": per_layer(lambda: dp(False)),
            "dp overlap": per_layer(lambda: dp(True)),
            "exchange R": per_layer(lambda: [exchange(x_full, residual_full) for _ in range(CALLS)]),
            "exchange R/2": per_layer(lambda: [exchange(x_half, residual_half) for _ in range(CALLS)]),
            "attention tp": per_layer(lambda: [attend(qkv_tp, half_heads_kv, Q_HEADS // 2) for _ in range(CALLS)]),
            "attention dp": per_layer(lambda: [attend(qkv_dp, own_seqs_kv, Q_HEADS) for _ in range(CALLS)]),
        }
        for name, which, inputs in (("tp", "tp", x_full), ("dp", "dp", x_half)):
            times[f"qkv {name}"] = per_layer(lambda w=weights[which], x=inputs: [x @ v["qkv"].t() for v in w])
            o_in = torch.empty(inputs.shape[0], weights[which][0]["o"].shape[1], **bf16).normal_(generator=gen)
            times[f"o_proj {name}"] = per_layer(lambda w=weights[which], x=o_in: [x @ v["o"].t() for v in w])
        times["gate_up tp"] = per_layer(lambda: [x_full @ v["gate_up"].t() for v in weights["tp"]])
        times["gate_up R/2 tp"] = per_layer(lambda: [x_half @ v["gate_up"].t() for v in weights["tp"]])
        times["halving tp1"] = times["tp1"] / 2
        file_times(results, f"R={rows}", times, rank)
    hand_back(queue, rank, results)


def main() -> None:
    two_rank_rows_benchmark("dp_attention_layer", __doc__, _rank, "us per layer (rank 0)", CALLS, 400)


if __name__ == "__main__":
    main()
