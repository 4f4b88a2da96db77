"""The one-shot push all-reduce kernel, on CPU: three processes stand in for three GPUs, each running
the kernel in Triton's interpreter over exchange buffers in shared memory."""

import importlib.util
import os

import pytest
import torch
import torch.multiprocessing as mp

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

WORLD, ROWS, HIDDEN, CALLS, EPS = 3, 3, 64, 5, 1e-5
FUSED_CALLS = (1, 3)  # the calls that go on into the residual add and RMSNorm


def _rank(rank, exchanges, rounds, inputs, residuals, weight, outputs):
    os.environ["TRITON_INTERPRET"] = "1"
    import interpreter

    assert interpreter.enable()
    from albireo.kernels.triton_all_reduce import ROUNDS, push_all_reduce

    slot_numel = exchanges[0].numel() // (ROUNDS * WORLD)
    peers = torch.tensor([e.data_ptr() for e in exchanges], dtype=torch.int64)
    for call in range(CALLS):
        x = inputs[rank][call].clone()
        if call in FUSED_CALLS:
            out, _ = push_all_reduce(x, peers, rounds[rank], slot_numel, rank, residuals[rank][call], weight, EPS)
        else:
            out = push_all_reduce(x, peers, rounds[rank], slot_numel, rank)
        outputs[rank][call].copy_(out)


@pytest.fixture(scope="module")
def run():
    dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(ROWS, HIDDEN, generator=g) for _ in range(CALLS)] for _ in range(WORLD)]
    inputs[0][0][0, :4] = -0.0  # a value that looks like an empty slot must still count
    residual = [torch.randn(ROWS, HIDDEN, generator=g) for _ in range(CALLS)]
    residuals = [[r.clone().share_memory_() for r in residual] for _ in range(WORLD)]
    weight = torch.randn(HIDDEN, generator=g)
    exchanges = [torch.full((3 * WORLD * 2 * ROWS * HIDDEN,), -0.0, dtype=dtype).share_memory_() for _ in range(WORLD)]
    rounds = [torch.zeros(2, dtype=torch.int32).share_memory_() for _ in range(WORLD)]
    outputs = [[torch.empty(ROWS, HIDDEN).share_memory_() for _ in range(CALLS)] for _ in range(WORLD)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, exchanges, rounds, inputs, residuals, weight, outputs))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD
    sums = [inputs[0][c] + inputs[1][c] + inputs[2][c] for c in range(CALLS)]  # rank order, in fp32
    return dict(sums=sums, residual=residual, residuals=residuals, weight=weight, exchanges=exchanges,
                rounds=rounds, outputs=outputs)


def test_every_rank_gets_the_sum_of_all_ranks_rows_in_rank_order(run):
    for call in set(range(CALLS)) - set(FUSED_CALLS):
        for rank in range(WORLD):
            assert torch.equal(run["outputs"][rank][call], run["sums"][call])


def test_fused_call_adds_the_residual_in_place_and_returns_its_rms_norm(run):
    from albireo.layers.norm import RMSNorm

    norm = RMSNorm(HIDDEN, EPS)
    norm.weight.data.copy_(run["weight"])
    for call in FUSED_CALLS:
        added = run["sums"][call] + run["residual"][call]
        for rank in range(WORLD):
            assert torch.equal(run["residuals"][rank][call], added)
            torch.testing.assert_close(run["outputs"][rank][call], norm(added), rtol=1e-5, atol=1e-5)


def test_calls_leave_every_slot_empty_and_the_round_advanced(run):
    for exchange, rounds in zip(run["exchanges"], run["rounds"]):
        assert torch.equal(exchange.view(torch.int32), torch.full_like(exchange.view(torch.int32), -(2**31)))
        assert rounds.tolist() == [CALLS % 3, 0]
