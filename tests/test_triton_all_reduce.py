"""The push all-reduce kernel, on CPU: three processes stand in for three GPUs, each running the
kernel in Triton's interpreter over exchange buffers in shared memory. Some calls take their rows
from a GEMV that pushed them into the peers' slots itself (the batch-1 path), some run two-shot
(each row summed by the rank that owns it and sent back)."""

import os

import pytest
import torch

import interpreter

interpreter.require_triton()

WORLD, ROWS, HIDDEN, EPS = 3, 4, 64, 1e-5  # rank 0 owns two rows two-shot, the others one
GEMV_K = 8  # a pushing GEMV's rows are one-hot over its K: its products are exact weight columns
# (kind, programs), kind "sum", "fused" (with add + RMSNorm), "pushed" (a pushing GEMV, then the
# fused call told so), "two-shot sum" or "two-shot fused": more calls than rounds, so buffers are
# reused; some with fewer programs than rows, so a program pushes all its rows before it waits for
# any (and, two-shot, holds rows of several owners).
CALLS = [("sum", None), ("fused", None), ("pushed", None), ("two-shot sum", None), ("sum", 2), ("fused", 1),
         ("two-shot fused", 2), ("pushed", None), ("two-shot sum", 1), ("two-shot fused", None), ("sum", None)]
FUSED = ("fused", "pushed", "two-shot fused")
# A slot as tight as the engine sizes it: one-shot, all rows; two-shot, two halves of an owner's share.
# Past each buffer's last slot lies a guard row no call may touch.
SLOT = max(ROWS, 2 * -(-ROWS // WORLD)) * HIDDEN
GUARD = 7.0
EMPTY = {torch.float32: (torch.int32, -(2**31)), torch.bfloat16: (torch.int16, -(2**15))}


def _one_hot_rows(dtype):
    x = torch.zeros(ROWS, GEMV_K, dtype=dtype)
    x[torch.arange(ROWS), torch.arange(ROWS) % GEMV_K] = 1.0
    return x


def _rank(rank, exchanges, rounds, inputs, residuals, weight, outputs):
    os.environ["TRITON_INTERPRET"] = "1"
    import interpreter

    assert interpreter.enable()
    from albireo.kernels.triton_all_reduce import ExchangeSlots, push_all_reduce
    from albireo.kernels.triton_gemv import gemv

    slot_numel = SLOT
    peers = torch.tensor([e.data_ptr() for e in exchanges], dtype=torch.int64)
    for call, (kind, programs) in enumerate(CALLS):
        x = inputs[rank][call].clone()
        if kind == "pushed":
            # A weight whose product with the one-hot rows is this call's input x, exactly.
            gemv_weight = torch.zeros(HIDDEN, GEMV_K, dtype=x.dtype)
            gemv_weight[:, torch.arange(ROWS) % GEMV_K] = x.t()
            x = gemv(_one_hot_rows(x.dtype), gemv_weight, push=ExchangeSlots(peers, rounds[rank], slot_numel, rank))
        two_shot = kind.startswith("two-shot")
        if kind not in FUSED:
            out = push_all_reduce(x, peers, rounds[rank], slot_numel, rank, max_programs=programs, two_shot=two_shot)
        else:
            out, _ = push_all_reduce(x, peers, rounds[rank], slot_numel, rank, residuals[rank][call], weight, EPS,
                                     max_programs=programs, pushed=kind == "pushed", two_shot=two_shot)
        outputs[rank][call].copy_(out)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def run(request):
    from albireo.kernels.triton_all_reduce import ROUNDS

    dtype = request.param
    g = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(ROWS, HIDDEN, generator=g).to(dtype) for _ in CALLS] for _ in range(WORLD)]
    inputs[0][0][0, :4] = -0.0  # a value that looks like an empty slot must still count
    residual = [torch.randn(ROWS, HIDDEN, generator=g).to(dtype) for _ in CALLS]
    # Two-shot parts of -0.0 from every rank (and a residual of -0.0): each must cross as +0.0, or
    # the row's owner would wait for it forever, and the total that comes back must not be -0.0.
    for call in (CALLS.index(("two-shot sum", None)), CALLS.index(("two-shot fused", 2))):
        for rank in range(WORLD):
            inputs[rank][call][1, :4] = -0.0
        residual[call][1, :4] = -0.0
    residuals = [[r.clone().share_memory_() for r in residual] for _ in range(WORLD)]
    weight = torch.randn(HIDDEN, generator=g).to(dtype)
    exchanges = [torch.cat([torch.full((ROUNDS * WORLD * SLOT,), -0.0), torch.full((HIDDEN,), GUARD)]).to(dtype)
                 .share_memory_() for _ in range(WORLD)]
    rounds = [torch.zeros(2, dtype=torch.int32).share_memory_() for _ in range(WORLD)]
    outputs = [[torch.empty(ROWS, HIDDEN, dtype=dtype).share_memory_() for _ in CALLS] for _ in range(WORLD)]
    assert interpreter.spawn_ranks(_rank, WORLD, exchanges, rounds, inputs, residuals, weight, outputs) == [0] * WORLD
    # Summed in rank order in fp32, as the kernel does, then rounded to the dtype.
    sums = [sum(inputs[r][c].float() for r in range(WORLD)).to(dtype) for c in range(len(CALLS))]
    return dict(dtype=dtype, rounds_total=ROUNDS, sums=sums, residual=residual, residuals=residuals,
                weight=weight, exchanges=exchanges, rounds=rounds, outputs=outputs)


def _assert_equal(run, got, expected):
    if run["dtype"] == torch.float32:
        assert torch.equal(got, expected)
    else:  # the interpreter rounds fp32 to bf16 by truncation, torch to nearest: a step or two apart
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-6, atol=2**-4)


def test_every_rank_gets_the_sum_of_all_ranks_rows_in_rank_order(run):
    for call, (kind, _) in enumerate(CALLS):
        if kind not in FUSED:
            for rank in range(WORLD):
                _assert_equal(run, run["outputs"][rank][call], run["sums"][call])


def test_fused_call_adds_the_residual_in_place_and_returns_its_rms_norm(run):
    """Also where a pushing GEMV sent the rows (each rank's own row is its product, each peer's
    arrives in its slot, and the residual row read before the wait is the row's own) and two-shot."""
    from albireo.layers.norm import RMSNorm

    norm = RMSNorm(HIDDEN, EPS).to(run["dtype"])
    norm.weight.data.copy_(run["weight"])
    for call, (kind, _) in enumerate(CALLS):
        if kind in FUSED:
            added = (run["sums"][call].float() + run["residual"][call].float()).to(run["dtype"])
            for rank in range(WORLD):
                _assert_equal(run, run["residuals"][rank][call], added)
                torch.testing.assert_close(run["outputs"][rank][call], norm(added), rtol=2e-2, atol=2e-2)


def test_two_shot_gives_every_rank_the_same_bits_its_owner_summed(run):
    for call, (kind, _) in enumerate(CALLS):
        if kind.startswith("two-shot"):
            for rank in range(1, WORLD):
                assert torch.equal(run["outputs"][rank][call], run["outputs"][0][call])
                assert torch.equal(run["residuals"][rank][call], run["residuals"][0][call])


def test_two_shot_fits_where_each_owner_share_fits_half_a_slot():
    from albireo.kernels.triton_all_reduce import fits

    x = torch.zeros(9, 64)  # over four ranks, rank 0 owns three rows (0, 4, 8): 3 x 64 in each half
    assert fits(x, slot_numel=2 * 3 * 64, world=4, two_shot=True)
    assert not fits(x, slot_numel=2 * 3 * 64 - 1, world=4, two_shot=True)
    assert not fits(x, slot_numel=2 * 3 * 64, world=4)  # one-shot needs all nine rows


def test_calls_leave_every_slot_empty_write_nothing_past_them_and_advance_the_round(run):
    int_type, empty = EMPTY[run["dtype"]]
    for exchange, rounds in zip(run["exchanges"], run["rounds"]):
        slots = exchange[:-HIDDEN].view(int_type)
        assert torch.equal(slots, torch.full_like(slots, empty))
        assert torch.equal(exchange[-HIDDEN:], torch.full((HIDDEN,), GUARD, dtype=run["dtype"]))
        assert rounds.tolist() == [len(CALLS) % run["rounds_total"], 0]
