"""What each host call of the copy-engine all-reduce costs (albireo/distributed/copy_engine_all_reduce.py).

At four ranks an eager prefill layer's exchange is ~40 calls and cost the host ~0.9 ms against
~0.2-0.4 through NCCL (bench/row_parallel_allreduce.py, "layer ce host"). This times each kind of
call alone, per call, with the GPU busy (a sleeping kernel ahead, as when the host runs ahead of
the GPU) and idle, with the driver loaded as ctypes.PyDLL (the GIL held, as the engine does) and
as ctypes.CDLL (the GIL dropped and taken back around each call), and with a second Python thread
busy beside the caller, as a worker's or the engine's other threads may be.
    python bench/ce_host_calls.py [--tp 2] [--calls 100]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int, calls: int) -> None:
    from albireo.bench.record import host_us
    from albireo.distributed.copy_engine_all_reduce import CopyEngineAllReduce, _Driver

    torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    ce = CopyEngineAllReduce(dist.group.WORLD, torch.device("cuda", rank), torch.bfloat16, 64 * 2**20, above_bytes=0)
    peer = ce.peers[0]
    main, side = torch.cuda.current_stream().cuda_stream, ce.streams[peer].cuda_stream
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = torch.zeros(128, 4096, dtype=torch.bfloat16, device="cuda")  # 1 MiB
    x, w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16), torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)

    def driver_calls(d: _Driver) -> dict:
        return {  # every flag written here is written 0, which is what the engine's flags are between calls
            "write a flag (local)": lambda: d.write(main, flag.data_ptr(), 0),
            "write a flag (peer)": lambda: d.write(side, ce._flag(peer, 0, 0, rank), 0),
            "wait on a flag (met)": lambda: d.wait(main, flag.data_ptr(), 0),
            "copy 1 MiB to the peer": lambda: d.copy(side, ce.peer_region_ptrs[peer], rows.data_ptr(), rows.nbytes),
            "record + wait an event": lambda: (d.record(ce.made, main), d.wait_event(side, ce.made)),
        }

    rows_of = {}
    for loader in (ctypes.PyDLL, ctypes.CDLL):
        for name, fn in driver_calls(_Driver(loader)).items():
            rows_of[f"{name}, {loader.__name__}"] = fn
    rows_of.update({
        "send (the engine's, whole)": lambda: ce.send(main, rows, 0, 0, {peer: 0}),
        "matmul 4096x1024x1024 (torch)": lambda: torch.matmul(x, w),
        "current stream handle (torch)": lambda: torch.cuda.current_stream().cuda_stream,
    })
    stop = threading.Event()

    def spin() -> None:  # pure Python: holds the GIL whenever it runs
        n = 0
        while not stop.is_set():
            n += 1

    busy = 50_000_000  # ~25 ms of GPU time: every call only queues
    table = {name: [host_us(fn, calls, busy), host_us(fn, calls)] for name, fn in rows_of.items()}
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    for name, fn in rows_of.items():
        table[name].append(host_us(fn, calls, busy))
    stop.set()
    spinner.join()
    if rank == 0:
        print(f"us per call, rank 0 of {world}, {torch.cuda.get_device_name()}: GPU busy | GPU idle | GPU busy, a thread spinning")
        for name, (busy, idle, contended) in table.items():
            print(f"{name:<40} {busy:8.2f} {idle:8.2f} {contended:8.2f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--calls", type=int, default=100)
    args = p.parse_args()
    from albireo.executor.executor import free_port

    mp.spawn(_rank, args=(args.tp, free_port(), args.calls), nprocs=args.tp)


if __name__ == "__main__":
    main()
