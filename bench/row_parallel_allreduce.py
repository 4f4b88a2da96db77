"""What a row-parallel layer and its all-reduce cost under TP (2 by default), on NCCL, the push
kernel or the copy engines (albireo/distributed/copy_engine_all_reduce.py), for prefill and decode
sizes.

Prefill (eager, as the engine runs it): a 16k-token step of an 8B model all-reduces 64 tensors of
16384 x 4096 bf16 (128 MiB); through NCCL they took 37 of the step's ~222 ms on two H200s. For each
row count this times the matmul alone (down_proj's shape), NCCL's all-reduce alone, the two in
turn, the matmul in row chunks with NCCL all-reducing each chunk while the next multiplies, and
`CopyEngineAllReduce.linear` with its sum (each rank adds its own run of the rows, then the runs
are exchanged), checked against NCCL's sum; then the engine's layer as a prefill step runs it (the
row-parallel layer, its residual add and norm, and the next column-parallel layer, gate_up's shape)
with NCCL and the fused norm, and with the copy engines, each rank normalizing its own rows. Run it
under NCCL_* settings to compare them: NCCL ran at 274-283 GB/s whatever its protocol or channels
(nccl-prefill-allreduce-h200x2-ad9cfcd.txt).

Decode (in CUDA graphs, as the engine replays them): the engine's RowParallelLinear with its
residual add and RMSNorm, o_proj's and down_proj's shapes, through the one-shot push kernel fused
with the norm, or through the copy engines, each rank normalizing its own run of the rows.
    python bench/row_parallel_allreduce.py [--tp 4] [--rows 2048 4096 8192 16384] [--decode-rows 128 256 512 1024]
Shapes are llama-3.1-8b's divided by the TP size.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALLS = 8  # row-parallel layers per captured decode graph


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


def _rank(rank: int, world: int, port: int, rows_list: list[int], hidden: int, inner: int, decode_rows: list[int]) -> None:
    from albireo.distributed import copy_engine_all_reduce as cear
    from albireo.distributed import parallel_state as ps

    torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    ps.set_tensor_parallel_group(dist.group.WORLD)  # the engine's layers sum over it
    max_rows = max(rows_list)
    ce = cear.CopyEngineAllReduce(dist.group.WORLD, torch.device("cuda", rank), torch.bfloat16,
                                  max_rows * hidden * 2, above_bytes=0)
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
        times["ce split sum"] = _ms(lambda: ce.linear(x, w).total())
        worst = (ce.linear(x, w).total() - expected).abs().max().item()
        times.update(_layer_times(ce, rows, hidden, inner))
        if rank == 0:
            gbps = rows * hidden * 2 / times["nccl"] / 1e6
            line = ", ".join(f"{k} {v:.3f}" for k, v in times.items())
            print(f"[{settings}] rows {rows} ({rows * hidden * 2 / 2**20:.0f} MiB, NCCL {gbps:.0f} GB/s) ms: {line}; "
                  f"copy-engine sum vs NCCL max |diff| {worst:g}", flush=True)
    _decode_table(rank, world, decode_rows, hidden, inner)
    dist.destroy_process_group()


def _layer_times(ce, rows: int, hidden: int, inner: int) -> dict[str, float]:
    """ms of down_proj, its residual add and norm and the next gate_up as the engine runs them in a
    prefill step (eagerly, and replayed in a CUDA graph): with NCCL and the fused norm, and with the
    copy engines."""
    from albireo.bench.record import graph_us, host_us
    from albireo.distributed import parallel_state as ps
    from albireo.layers.linear import ColumnParallelLinear, RowParallelLinear
    from albireo.layers.norm import RMSNorm

    world = dist.get_world_size()
    device = torch.device("cuda", dist.get_rank())
    down = RowParallelLinear(world * inner, hidden).to(device, torch.bfloat16)
    down.weight.data.normal_(0, 0.02)
    gate_up = ColumnParallelLinear(hidden, [world * inner, world * inner]).to(device, torch.bfloat16)
    gate_up.weight.data.normal_(0, 0.02)
    norm = RMSNorm(hidden, 1e-5).to(device, torch.bfloat16)
    x = torch.randn(rows, inner, device=device, dtype=torch.bfloat16)
    residual = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)

    def layer() -> None:  # twice: an even number of calls, as a forward makes (the copy-engine slots)
        for _ in range(2):
            gate_up(down(x, residual=residual, norm=norm)[0])

    times = {}
    for name, path in (("nccl", None), ("ce", ce)):
        ps._copy_engine_all_reduce = path
        times[f"layer {name}"] = _ms(layer) / 2
        times[f"layer {name} host"] = host_us(layer, 10) / 2e3
        # In a CUDA graph, where no host launches between the kernels can hold the GPU up.
        times[f"layer {name} graph"] = graph_us(layer, 2, replays=5) / 1e3
    ps._copy_engine_all_reduce = None
    return times


def _decode_table(rank: int, world: int, rows_list: list[int], hidden: int, down_inner: int) -> None:
    from albireo.bench.record import graph_us
    from albireo.distributed import parallel_state as ps
    from albireo.distributed.copy_engine_all_reduce import CopyEngineAllReduce
    from albireo.layers.linear import RowParallelLinear, whole
    from albireo.layers.norm import RMSNorm

    device = torch.device("cuda", rank)
    ps.enable_symm_all_reduce(device, torch.bfloat16)
    norm = RMSNorm(hidden, 1e-5).to(device, torch.bfloat16)
    for rows in rows_list:
        times = {}
        for name, inner in (("o_proj", hidden // world), ("down_proj", down_inner)):
            layer = RowParallelLinear(world * inner, hidden).to(device, torch.bfloat16)
            layer.weight.data.normal_(0, 0.02)
            x = torch.randn(rows, inner, device=device, dtype=torch.bfloat16)
            residual = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)

            def step() -> None:  # an even number of layers, as a forward makes (the copy-engine slots)
                for _ in range(CALLS):
                    whole(layer(x, residual=residual, norm=norm)[0])

            ps._copy_engine_all_reduce = None
            times[f"{name} push"] = graph_us(step, CALLS)
            ps._copy_engine_all_reduce = CopyEngineAllReduce(ps.tp_group(), device, torch.bfloat16,
                                                             rows * hidden * 2, above_bytes=0)
            times[f"{name} ce"] = graph_us(step, CALLS)
            ps._copy_engine_all_reduce = None
        if rank == 0:
            line = ", ".join(f"{k} {v:.1f}" for k, v in times.items())
            print(f"decode rows {rows} (graphs, us per layer with its norm): {line}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inner", type=int, help="down_proj's input features per rank (14336 / tp by default)")
    p.add_argument("--decode-rows", type=int, nargs="*", default=[128, 256, 512, 1024])
    args = p.parse_args()
    from albireo.executor.executor import free_port

    inner = args.inner or 14336 // args.tp
    mp.spawn(_rank, args=(args.tp, free_port(), args.rows, args.hidden, inner, args.decode_rows), nprocs=args.tp)


if __name__ == "__main__":
    main()
