"""Is the one-shot all-reduce's NVLink rate (~315 GB/s at TP=2, two H200s) set by how the SMs store
into the peer's memory? The engine's scheme without the norm (albireo/kernels/triton_all_reduce.py),
with its pushes as plain 16-byte stores (stg, as the engine) or as TMA bulk stores of 16 x 256
elements through a tensor descriptor of the peer's buffer (tma), for rows x 4096 bf16, 64 calls in
a CUDA graph, each checked against NCCL's sum.
    python bench/tma_push_all_reduce.py
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.ranks import hand_back, run_ranks
from albireo.bench.record import graph_us
from albireo.kernels.triton_all_reduce import ROUNDS, _empty, advance_round, as_summand

SUB = tl.constexpr(256)  # TMA box width (elements)


@triton.jit(do_not_specialize=["rows"])
def _ar(x_ptr, peers_ptr, round_ptr, peer_desc, rows, slot_numel, N: tl.constexpr,
        RANK: tl.constexpr, WORLD: tl.constexpr, ROUNDS: tl.constexpr, MODE: tl.constexpr):
    first = tl.program_id(0)
    step = tl.num_programs(0)
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, N)
    empty = tl.full([N], -32768, tl.int16).to(dtype, bitcast=True)
    turn = tl.load(round_ptr)
    round_base = turn.to(tl.int64) * WORLD * slot_numel
    PEER: tl.constexpr = 1 - RANK
    for row in range(first, rows, step):
        at = row * N
        if MODE == 0:
            x = as_summand(tl.load(x_ptr + at + cols), False)
            buffer = tl.multiple_of(tl.load(peers_ptr + PEER).to(tl.pointer_type(dtype)), 16)
            tl.store(buffer + round_base + RANK * slot_numel + at + cols, x)
        else:
            sub = tl.arange(0, N // SUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]
            x = as_summand(tl.load(x_ptr + at + sub), False)
            first_sub = (round_base + RANK * slot_numel + at) // SUB
            peer_desc.store([first_sub.to(tl.int32), 0], x)
    own = tl.multiple_of(tl.load(peers_ptr + RANK).to(tl.pointer_type(dtype)), 16)
    for row in range(first, rows, step):
        at = row * N
        mine = tl.load(x_ptr + at + cols)
        slot = own + round_base + PEER * slot_numel + at + cols
        v = tl.load(slot, volatile=True)
        while tl.max(_empty(v, False).to(tl.int32), axis=0) > 0:
            v = tl.load(slot, volatile=True)
        tl.store(slot, empty)
        tl.store(x_ptr + at + cols, (mine.to(tl.float32) + v.to(tl.float32)).to(dtype))
    advance_round(round_ptr, turn, step, ROUNDS)


def _rank(rank, world, port, queue):
    import torch.distributed._symmetric_memory as symm_mem
    from triton.tools.tensor_descriptor import TensorDescriptor
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    n = 4096
    slot_numel = 1024 * n
    buf = symm_mem.empty(ROUNDS * world * slot_numel, dtype=torch.bfloat16, device=dev)
    buf.fill_(-0.0)
    torch.cuda.synchronize()
    handle = symm_mem.rendezvous(buf, dist.group.WORLD)
    peers = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=dev)
    rounds = torch.zeros(2, dtype=torch.int32, device=dev)
    peer_view = handle.get_buffer(1 - rank, (ROUNDS * world * slot_numel // SUB.value, SUB.value), torch.bfloat16)
    desc = TensorDescriptor.from_tensor(peer_view, [n // SUB.value, SUB.value])  # one row of n a box
    lines = []
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for rows in (64, 256, 512, 1024):
        for mode in (0, 1):
            for programs, warps in ((2 * sms, 8), (2 * sms, 4), (sms, 8)):
                grid = min(rows, programs)
                g = torch.Generator(device=dev).manual_seed(rows * 10 + rank)
                x0 = torch.randn(rows, n, device=dev, dtype=torch.bfloat16, generator=g)
                x = x0.clone()
                _ar[(grid,)](x, peers, rounds, desc, rows, slot_numel, N=n, RANK=rank, WORLD=world, ROUNDS=ROUNDS,
                             MODE=mode, num_warps=warps)
                dist.all_reduce(x0)
                err = (x - x0).abs().max().item()

                def fn(grid=grid, mode=mode, warps=warps, x=x, rows=rows):
                    for _ in range(64):
                        _ar[(grid,)](x, peers, rounds, desc, rows, slot_numel, N=n, RANK=rank, WORLD=world,
                                     ROUNDS=ROUNDS, MODE=mode, num_warps=warps)
                us = graph_us(fn, 64)
                lines.append(f"rows {rows:5d} ({rows * n * 2 / 2**20:.1f} MiB) {'tma  ' if mode else 'stg  '} "
                             f"programs {grid:4d} warps {warps}: {us:6.2f} us  max|diff| vs NCCL {err:g}")
                if rank == 0:
                    print(lines[-1], flush=True)
    hand_back(queue, rank, lines)


if __name__ == "__main__":
    run_ranks(_rank, 2, timeout=250)
