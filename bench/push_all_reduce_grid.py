"""How many programs and warps the one-shot push kernel (with add + RMSNorm) should use at decode
sizes: 64 calls in a CUDA graph, two ranks. Grids whose programs cannot all be resident at once
(the kernel would wait forever) are skipped.
    python bench/push_all_reduce_grid.py
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.ranks import hand_back, run_ranks
from albireo.bench.record import graph_us


def _rank(rank, world, port, queue):
    from albireo.distributed.symm_all_reduce import MAX_BYTES, SymmMemAllReduce
    from albireo.kernels import triton_all_reduce as k
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    symm = SymmMemAllReduce(dist.group.WORLD, dev, torch.bfloat16, one_shot_bytes=MAX_BYTES)
    sms = torch.cuda.get_device_properties(rank).multi_processor_count
    hidden = 4096
    w = torch.randn(hidden, device=dev, dtype=torch.bfloat16)
    lines = []
    for rows in (64, 256, 512):
        x = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16)
        res = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(x)
        for programs, warps in [(sms, 8), (sms, 16), (sms, 4), (2 * sms, 8), (2 * sms, 4), (4 * sms, 4), (4 * sms, 2)]:
            grid = min(rows, programs)
            args = (x, out, res, w, symm.peers, symm.rounds, rows, symm.push_target.slot_numel, hidden, 1e-5)
            kw = dict(RANK=rank, WORLD=world, ROUNDS=k.ROUNDS, WIDE=False, HAS_NORM=True, BLOCK=hidden, PDL=False, PUSHED=False,
                      TWO_SHOT=False,
                      num_warps=warps)
            compiled = k._push_all_reduce_kernel.warmup(*args, grid=(grid,), **kw)
            if hasattr(compiled, '_init_handles'):
                compiled._init_handles()
            threads = 32 * warps
            per_sm = min(65536 // max(compiled.n_regs * threads, 1), 2048 // threads, 32)
            ok = torch.tensor([grid <= per_sm * sms], device=dev, dtype=torch.int32)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not ok.item():
                lines.append(f"rows {rows:4d} programs {grid:4d} warps {warps:2d}: skipped (regs {compiled.n_regs}, {per_sm}/SM)")
                continue
            def fn():
                return k._push_all_reduce_kernel[(grid,)](*args, **kw)

            us = graph_us(lambda: [fn() for _ in range(64)], 64)
            lines.append(f"rows {rows:4d} programs {grid:4d} warps {warps:2d}: {us:6.1f} us (regs {compiled.n_regs}, spills {compiled.n_spills})")
            if rank == 0:
                print(lines[-1], flush=True)
    hand_back(queue, rank, lines)


if __name__ == "__main__":
    run_ranks(_rank, 2, timeout=200)
