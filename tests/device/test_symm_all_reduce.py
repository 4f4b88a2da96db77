"""All-reduce over peer memory sums exactly what NCCL sums, eagerly and replayed in a CUDA graph."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

# One-shot sizes, two-shot sizes, and one past the limit (NCCL).
NUMELS = [8, 4096, 64 * 4096, 512 * 4096, 8 * 2**20 // 2 + 4096]


def _rank(rank, world, port, dtype, queue):
    import torch.distributed as dist

    from albireo.distributed import parallel_state as ps

    torch.cuda.set_device(rank)
    ps.init_distributed(rank, world, f"tcp://127.0.0.1:{port}", "nccl")
    assert ps.enable_symm_all_reduce(torch.device("cuda", rank), dtype)
    worst = 0.0
    for numel in NUMELS:
        for _ in range(3):  # fresh inputs each time: the buffers alternate between calls
            x = torch.randn(numel, device="cuda", dtype=dtype)
            expected = x.clone()
            dist.all_reduce(expected)
            eager = ps.tp_all_reduce(x.clone())
            static = torch.full_like(x, float("nan"))  # poisoned: the graph must overwrite it
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                ps.tp_all_reduce(static)
            static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            worst = max(worst, (eager - expected).abs().max().item(), (static - expected).abs().max().item())
    dist.barrier()
    if rank == 0:
        queue.put(worst)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_symm_all_reduce_equals_nccl(dtype):
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, dtype, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    worst = queue.get(timeout=180)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    # Two ranks: a + b is the same sum whichever kernel adds it.
    assert worst == 0.0
