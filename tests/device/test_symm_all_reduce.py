"""All-reduce over peer memory sums what NCCL sums, eagerly and replayed in CUDA graphs, and the
one-shot kernel fused with the residual add and RMSNorm equals the all-reduce followed by them;
sampling candidates swapped over peer memory give the tokens NCCL's all-gather gives."""

import pytest
import torch

from albireo.bench.ranks import hand_back, run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

# Shapes of one-shot sizes (the push kernel at every TP size up to 256 KiB, and at TP=2 up to
# 8 MiB), two-shot sizes at TP > 2 (129 rows: the owners' shares differ), and one past 8 MiB (NCCL).
SHAPES = [(8,), (1, 4096), (3, 4096), (32, 4096), (64, 4096), (129, 4096), (512, 4096), (2048 + 1, 4096)]


def _join(rank, world, port, dtype):
    from albireo.distributed import parallel_state as ps

    torch.cuda.set_device(rank)
    ps.init_distributed(rank, world, ps.Rendezvous("127.0.0.1", port), "nccl")
    assert ps.enable_symm_all_reduce(torch.device("cuda", rank), dtype)
    return ps


def _sums(rank, world, port, queue, dtype):
    import torch.distributed as dist

    ps = _join(rank, world, port, dtype)
    worst = 0.0
    for shape in SHAPES:
        for _ in range(3):  # fresh inputs each time: the rounds of the exchange buffers turn over
            x = torch.randn(shape, device="cuda", dtype=dtype)
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
    hand_back(queue, rank, worst)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("world", [2, 4, 8])
def test_symm_all_reduce_equals_nccl(dtype, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    worst = run_ranks(_sums, world, dtype)
    # Two ranks: a + b is the same sum whichever kernel adds it. More may add in another order and
    # round in between (NCCL), each rounding moving a sum of size ~10 by up to a bf16 step (0.0625).
    if world == 2:
        assert worst == 0.0
    else:
        assert worst <= (0.0625 * (world - 2) if dtype == torch.bfloat16 else 1e-5)


def _eager_call_differs(ps, g: torch.Generator) -> int:
    """1 if an eager all-reduce of one row (between graph replays, it moves the round on outside
    them) differs from NCCL's sum, else 0."""
    import torch.distributed as dist

    eager = torch.randn(4096, device="cuda", dtype=torch.bfloat16, generator=g)
    expected = eager.clone()
    dist.all_reduce(expected)
    return int(not torch.equal(ps.tp_all_reduce(eager), expected))


def _graph_replays_between_eager_calls(rank, world, port, queue):
    """A graph of two all-reduces (not a multiple of the three rounds) replayed again and again,
    with an eager call between some replays: each call must take its round from the device, or a
    replay would write into a buffer a peer is still reading."""
    import torch.distributed as dist

    ps = _join(rank, world, port, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(rank)
    xs = [torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2)]
    for x in xs:  # compile and warm up outside the capture
        ps.tp_all_reduce(x.clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for x in xs:
            ps.tp_all_reduce(x)
    wrong = 0
    for step in range(50):
        inputs = [torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16, generator=g) for _ in xs]
        expected = [x.clone() for x in inputs]
        for e in expected:
            dist.all_reduce(e)
        for x, value in zip(xs, inputs):
            x.copy_(value)
        graph.replay()
        wrong += sum(int(not torch.equal(x, e)) for x, e in zip(xs, expected))
        if step % 3 == 0:
            wrong += _eager_call_differs(ps, g)
    hand_back(queue, rank, wrong)


def test_graph_replays_between_eager_calls_stay_correct():
    assert run_ranks(_graph_replays_between_eager_calls, 2) == 0


def _fused(rank, world, port, queue):
    from albireo.layers.norm import RMSNorm

    ps = _join(rank, world, port, torch.bfloat16)
    norm = RMSNorm(4096, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data.normal_(1.0, 0.1, generator=torch.Generator(device="cuda").manual_seed(0))
    mismatches = 0
    for rows in (1, 5, 32, 129, 512):  # past two ranks, the last two run two-shot
        torch.manual_seed(rows * 10 + rank)
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        torch.manual_seed(rows)  # the residual is the same on every rank, as in the model
        residual = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        # The push kernel adds every row's parts in rank order (at two ranks, NCCL's a + b).
        expected_out, expected_residual = norm(_rounded_once(_gathered(x, world)), residual.clone())
        got_residual = residual.clone()
        fused = ps.tp_all_reduce_rms_norm(x.clone(), got_residual, norm.weight, norm.eps)
        assert fused is not None
        got_out, returned = fused
        assert returned is got_residual
        mismatches += int(not torch.equal(got_out, expected_out))
        mismatches += int(not torch.equal(got_residual, expected_residual))
    hand_back(queue, rank, mismatches)


@pytest.mark.parametrize("world", [2, 4])
def test_fused_all_reduce_add_norm_equals_all_reduce_then_norm(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    assert run_ranks(_fused, world) == 0


def _vocab_parallel_picks(rank, world, port, queue):
    """Each rank's Gumbel candidates over its shard of a 128k vocabulary, picked over peer memory
    and, as the reference, all-gathered by NCCL and picked by the single-GPU kernel."""
    import torch.distributed as dist

    from albireo.kernels.triton_sampling import chunks_for, gumbel_candidates, pick_candidates

    ps = _join(rank, world, port, torch.bfloat16)
    vocab = 128256
    shard = -(-vocab // world)
    wrong = 0
    for batch in (1, 7, 512, 1, 64):  # more calls than rounds; chunked rows and one chunk a row
        torch.manual_seed(batch)  # the same full logits on every rank, each keeping its shard
        logits = torch.randn(batch, vocab, device="cuda")
        logits[0, 5] = logits[0, vocab - 3] = 100.0  # a tie across the shards: the first column wins
        local = logits[:, rank * shard : (rank + 1) * shard].contiguous()
        temperature = torch.rand(batch, device="cuda")
        temperature[0] = 0.0
        seeds = torch.arange(batch, device="cuda", dtype=torch.int64) * 31 + 7
        lo = rank * shard
        scores, indices = gumbel_candidates(local, temperature, seeds, lo, min(lo + shard, vocab),
                                            chunks_for(batch, shard))
        picked = ps.tp_pick_candidates(scores, indices)
        gathered = [torch.empty_like(scores) for _ in range(world)], [torch.empty_like(indices) for _ in range(world)]
        dist.all_gather(gathered[0], scores)
        dist.all_gather(gathered[1], indices)
        expected = pick_candidates(torch.cat(gathered[0], dim=1), torch.cat(gathered[1], dim=1))
        wrong += int(picked is None or not torch.equal(picked, expected)) + int(expected[0].item() != 5)
    hand_back(queue, rank, wrong)


def test_vocab_parallel_pick_over_peer_memory_equals_nccl_gather_then_pick():
    assert run_ranks(_vocab_parallel_picks, 2) == 0


def _gathered(part: torch.Tensor, world: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part)
    return parts


def _rounded_once(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts added in turn in float32 and rounded once to their dtype, as our kernels sum."""
    total = parts[0].float()
    for part in parts[1:]:
        total += part.float()
    return total.to(parts[0].dtype)


def _owners_sums(part: torch.Tensor, world: int) -> torch.Tensor:
    """The all-reduce of every rank's `part` as the copy engines' path makes it: each run of rows
    summed by its owner, its own part first and then the next ranks' in turn (at two ranks that is
    NCCL's a + b)."""
    from albireo.distributed.copy_engine_all_reduce import row_runs

    parts = _gathered(part, world)
    total = torch.empty_like(part)
    for owner, (lo, hi) in enumerate(row_runs(part.shape[0], world)):
        total[lo:hi] = _rounded_once([parts[(owner + k) % world][lo:hi] for k in range(world)])
    return total


def _copy_engine_layers(rank, world, port, queue, dtype):
    """Row-parallel layers of several sizes in a row (both receive slots, both flag parities, a
    smaller call after a larger one, row counts that do not divide evenly), then through the norm
    that adds the peers' parts to each rank's own rows, and through a column-parallel layer that
    takes the norm's rows."""
    from albireo.distributed.copy_engine_all_reduce import row_runs
    from albireo.layers.linear import ColumnParallelLinear, RowParallelLinear, whole
    from albireo.layers.norm import RMSNorm

    ps = _join(rank, world, port, dtype)
    assert ps._copy_engine_all_reduce is None, "enabled without a largest activation size"
    ps._copy_engine_all_reduce = ps.CopyEngineAllReduce(ps.tp_group(), torch.device("cuda", rank), dtype,
                                                        4096 * 1024 * dtype.itemsize, above_bytes=0)
    layer = RowParallelLinear(world * 256, 1024).to("cuda", dtype)
    layer.weight.data.normal_(0, 0.05, generator=torch.Generator(device="cuda").manual_seed(rank))
    norm = RMSNorm(1024, 1e-5).to("cuda", dtype)
    after = ColumnParallelLinear(1024, [world * 128]).to("cuda", dtype)  # the same on every rank: one seed
    after.weight.data.normal_(0, 0.05, generator=torch.Generator(device="cuda").manual_seed(7))
    worst = 0.0
    for rows in (4096, 37, 1000, 4096, 8, 513):
        torch.manual_seed(rows * 10 + rank)
        x = torch.randn(rows, 256, device="cuda", dtype=dtype)
        # The layer multiplies each rank's run of rows on its own; cuBLAS may round a part
        # differently from the whole, so the reference multiplies the same runs.
        runs = row_runs(rows, world)
        expected = _owners_sums(torch.cat([x[lo:hi] @ layer.weight.t() for lo, hi in runs]), world)
        worst = max(worst, (layer(x) - expected).abs().max().item())
        torch.manual_seed(rows)  # the residual is the same on every rank, as in the model
        residual = torch.randn(rows, 1024, device="cuda", dtype=dtype)
        original = residual.clone()
        want_out, want_residual = norm(expected, residual.clone())
        got_out, got_residual = layer(x, residual=residual, norm=norm)
        own_lo, own_hi = got_out.sum.own
        worst = max(worst, (whole(got_out) - want_out).abs().max().item(),
                    (got_residual[own_lo:own_hi] - want_residual[own_lo:own_hi]).abs().max().item())
        # The next layer multiplies its own rows, then the peers' before them and after them.
        groups = ((own_lo, own_hi), (0, own_lo), (own_hi, rows))
        want_next = torch.empty(rows, after.weight.shape[0], device="cuda", dtype=dtype)
        for lo, hi in groups:
            want_next[lo:hi] = want_out[lo:hi] @ after.weight.t()
        got_next = after(layer(x, residual=original, norm=norm)[0])
        worst = max(worst, (got_next - want_next).abs().max().item())
    hand_back(queue, rank, worst)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_engine_all_reduce_equals_the_owners_sums_through_the_layer_its_norm_and_the_next_layer(dtype, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    assert run_ranks(_copy_engine_layers, world, dtype) == 0.0


def _gemv_push(rank, world, port, queue):
    """A row-parallel layer at one row (the batch-1 GEMV, which sends its product to the peers
    itself, with and without silu_mul), through its norm, eagerly and as a CUDA graph replayed
    between eager calls, against the GEMV's product summed by NCCL and normalized."""
    import torch.distributed as dist

    from albireo.kernels.triton_gemv import gemv
    from albireo.layers import linear
    from albireo.layers.linear import RowParallelLinear
    from albireo.layers.norm import RMSNorm

    ps = _join(rank, world, port, torch.bfloat16)
    probe = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert linear.GEMV_PUSH and ps.tp_push_rms_norm(probe, probe.clone()) is not None, "not the pushing path"
    layer = RowParallelLinear(2 * 1024, 4096).to("cuda", torch.bfloat16)
    layer.weight.data.normal_(0, 0.05, generator=torch.Generator(device="cuda").manual_seed(rank))
    norm = RMSNorm(4096, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data.normal_(1.0, 0.1, generator=torch.Generator(device="cuda").manual_seed(0))
    g = torch.Generator(device="cuda").manual_seed(rank)
    residual_g = torch.Generator(device="cuda").manual_seed(1)  # the same residual on every rank

    def inputs(silu_mul):
        x = torch.randn(1, 2048 if silu_mul else 1024, device="cuda", dtype=torch.bfloat16, generator=g)
        return x, torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=residual_g)

    def expected(x, residual, silu_mul):
        y = gemv(x, layer.weight, silu_mul)
        dist.all_reduce(y)
        return norm(y, residual.clone())

    mismatches = 0
    for silu_mul in (False, True, False):
        x, residual = inputs(silu_mul)
        want_out, want_residual = expected(x, residual, silu_mul)
        got_out, got_residual = layer(x, silu_mul=silu_mul, residual=residual.clone(), norm=norm)
        mismatches += int(not torch.equal(got_out, want_out)) + int(not torch.equal(got_residual, want_residual))
    static_x, static_residual = inputs(False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out, _ = layer(static_x, residual=static_residual, norm=norm)
    for step in range(20):
        x, residual = inputs(False)
        want_out, want_residual = expected(x, residual, False)
        static_x.copy_(x)
        static_residual.copy_(residual)
        graph.replay()
        mismatches += int(not torch.equal(static_out, want_out)) + int(not torch.equal(static_residual, want_residual))
        if step % 3 == 0:
            mismatches += _eager_call_differs(ps, g)
    hand_back(queue, rank, mismatches)


def test_batch_1_gemv_sending_its_part_itself_equals_nccl_then_norm():
    assert run_ranks(_gemv_push, 2) == 0
