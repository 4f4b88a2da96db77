"""The one-shot push all-reduce kernel, alone and fused into the GEMV before it, on CPU: three
processes stand in for three GPUs, each running the kernels in Triton's interpreter over exchange
buffers in shared memory."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import interpreter

interpreter.require_triton()

WORLD, ROWS, HIDDEN, EPS = 3, 3, 64, 1e-5
K = 64  # a rank's input features of the row-parallel GEMV, whose outputs are HIDDEN wide
# (kind, n), in order:
#   "sum": the push all-reduce of ROWS rows, n programs (None: one per row; fewer than rows, so a
#       program pushes all its rows before it waits for any);
#   "norm": the same fused with the residual add and RMSNorm;
#   "gemv", "gemv_silu": the GEMV of n rows (of silu(gate) * up) fused with the all-reduce, add and
#       norm (gemv_push_all_reduce), then the same inputs through gemv and the "norm" kernel, so the
#       two kernels take turns on the same rounds.
# More kernel calls than rounds, so buffers are reused.
CALLS = [("sum", None), ("norm", None), ("gemv", 1), ("sum", 2), ("gemv_silu", 2), ("norm", 1), ("gemv", 2),
         ("sum", None)]
GEMV = ("gemv", "gemv_silu")
# The GEMV's (BLOCK_N, BLOCK_K, warps, stages): 8 programs, each one K tile (the default config's
# 2048-wide tiles would only cost the interpreter time).
CONFIG = (8, 64, 4, 1)
KERNEL_CALLS = sum(2 if kind in GEMV else 1 for kind, _ in CALLS)
MINUS_ZERO = CALLS.index(("gemv", 1))  # the call whose GEMV gives rank 0 a -0.0 (in bf16)
EMPTY = {torch.float32: (torch.int32, -(2**31)), torch.bfloat16: (torch.int16, -(2**15))}


def _rank(rank, exchanges, rounds, inputs, residuals, weight, outputs, unfused):
    os.environ["TRITON_INTERPRET"] = "1"
    import interpreter

    assert interpreter.enable()
    from albireo.kernels.triton_all_reduce import (
        ROUNDS,
        gemv_push_all_reduce,
        push_all_reduce,
    )
    from albireo.kernels.triton_gemv import gemv

    slot_numel = exchanges[0].numel() // (ROUNDS * WORLD)
    peers = torch.tensor([e.data_ptr() for e in exchanges], dtype=torch.int64)
    for call, (kind, n) in enumerate(CALLS):
        if kind in GEMV:
            (x, w), silu = inputs[rank][call], kind == "gemv_silu"
            out, res = gemv_push_all_reduce(x, w, peers, rounds[rank], slot_numel, rank, residuals[rank][call],
                                            weight, EPS, silu_mul=silu, config=CONFIG)
            assert res is residuals[rank][call]
            partial, residual, normed = unfused[rank][call]
            partial.copy_(gemv(x, w, silu, config=CONFIG))
            normed.copy_(push_all_reduce(partial.clone(), peers, rounds[rank], slot_numel, rank, residual, weight,
                                         EPS)[0])
        elif kind == "norm":
            out, _ = push_all_reduce(inputs[rank][call].clone(), peers, rounds[rank], slot_numel, rank,
                                     residuals[rank][call], weight, EPS, max_programs=n)
        else:
            out = push_all_reduce(inputs[rank][call].clone(), peers, rounds[rank], slot_numel, rank, max_programs=n)
        outputs[rank][call].copy_(out)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def run(request):
    from albireo.kernels.triton_all_reduce import ROUNDS

    dtype = request.param
    g = torch.Generator().manual_seed(0)
    rows = [n if kind in GEMV else ROWS for kind, n in CALLS]

    def call_inputs(kind, n):
        if kind not in GEMV:
            return torch.randn(ROWS, HIDDEN, generator=g).to(dtype)
        x = torch.randn(n, 2 * K if kind == "gemv_silu" else K, generator=g).to(dtype)
        return x, torch.randn(HIDDEN, K, generator=g).to(dtype)

    def shared(call):
        return torch.empty(rows[call], HIDDEN, dtype=dtype).share_memory_()

    inputs = [[call_inputs(*c) for c in CALLS] for _ in range(WORLD)]
    inputs[0][0][0, :4] = -0.0  # a value that looks like an empty slot must still count
    # So must a GEMV output of -0.0: 2^-75 * -2^-74 is float32's least subnormal, -0.0 once rounded
    # to bf16 (in float32 it stays itself: there the GEMV gives no -0.0).
    x, w = inputs[0][MINUS_ZERO]
    x[0].zero_()
    x[0, 0], w[0, 0] = 2.0**-75, -(2.0**-74)
    residual = [torch.randn(r, HIDDEN, generator=g).to(dtype) for r in rows]
    residuals = [[r.clone().share_memory_() for r in residual] for _ in range(WORLD)]
    weight = torch.randn(HIDDEN, generator=g).to(dtype)
    exchanges = [torch.full((ROUNDS * WORLD * 2 * ROWS * HIDDEN,), -0.0, dtype=dtype).share_memory_()
                 for _ in range(WORLD)]
    rounds = [torch.zeros(2, dtype=torch.int32).share_memory_() for _ in range(WORLD)]
    outputs = [[shared(c) for c in range(len(CALLS))] for _ in range(WORLD)]
    # Per GEMV call, what the unfused kernels gave: (gemv's output, the residual, the normed output).
    unfused = [{c: (shared(c), residual[c].clone().share_memory_(), shared(c))
                for c, (kind, _) in enumerate(CALLS) if kind in GEMV} for _ in range(WORLD)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, exchanges, rounds, inputs, residuals, weight, outputs, unfused))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD
    # What each rank contributes: its input, or its GEMV's output (as the unfused gemv gave it).
    partials = [[unfused[r][c][0] if kind in GEMV else inputs[r][c] for c, (kind, _) in enumerate(CALLS)]
                for r in range(WORLD)]
    # Summed in rank order in fp32, as the kernels do, then rounded to the dtype.
    sums = [sum(partials[r][c].float() for r in range(WORLD)).to(dtype) for c in range(len(CALLS))]
    return dict(dtype=dtype, rounds_total=ROUNDS, sums=sums, residual=residual, residuals=residuals,
                weight=weight, exchanges=exchanges, rounds=rounds, outputs=outputs, inputs=inputs,
                partials=partials, unfused=unfused)


def _assert_equal(run, got, expected):
    if run["dtype"] == torch.float32:
        assert torch.equal(got, expected)
    else:  # the interpreter rounds fp32 to bf16 by truncation, torch to nearest: a step or two apart
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-6, atol=2**-4)


def test_every_rank_gets_the_sum_of_all_ranks_rows_in_rank_order(run):
    for call, (kind, _) in enumerate(CALLS):
        if kind == "sum":
            for rank in range(WORLD):
                _assert_equal(run, run["outputs"][rank][call], run["sums"][call])


def test_fused_call_adds_the_residual_in_place_and_returns_its_rms_norm(run):
    """The push kernel with add + norm, and the GEMV kernel fused with all of it."""
    from albireo.layers.norm import RMSNorm

    norm = RMSNorm(HIDDEN, EPS).to(run["dtype"])
    norm.weight.data.copy_(run["weight"])
    for call, (kind, _) in enumerate(CALLS):
        if kind != "sum":
            added = (run["sums"][call].float() + run["residual"][call].float()).to(run["dtype"])
            for rank in range(WORLD):
                _assert_equal(run, run["residuals"][rank][call], added)
                torch.testing.assert_close(run["outputs"][rank][call], norm(added), rtol=2e-2, atol=2e-2)


def test_gemv_fused_with_the_all_reduce_gives_what_gemv_then_the_push_kernel_give(run):
    """Bit for bit. (The interpreter sums a row for the norm in one order whatever the warps; on a
    GPU the residual is bit for bit too, the normed output where the two kernels' warps agree.)"""
    for call, (kind, _) in enumerate(CALLS):
        if kind in GEMV:
            for rank in range(WORLD):
                _, residual, normed = run["unfused"][rank][call]
                assert torch.equal(run["residuals"][rank][call], residual)
                assert torch.equal(run["outputs"][rank][call], normed)


def test_gemv_partials_are_each_ranks_products(run):
    """What the sums above add up are the GEMV's products (gemv's own tests check it in full)."""
    dtype = run["dtype"]
    for call, (kind, _) in enumerate(CALLS):
        if kind in GEMV:
            for rank in range(WORLD):
                x, w = (t.float() for t in run["inputs"][rank][call])
                if kind == "gemv_silu":
                    gate, up = x.chunk(2, dim=-1)
                    x = (F.silu(gate).to(dtype).float() * up).to(dtype).float()
                expected = F.linear(x, w).to(dtype)
                # In bf16 the interpreter truncates silu(gate), its product with up and the output
                # where torch rounds to nearest: sums of 64 products of about 1 drift by 0.1.
                torch.testing.assert_close(run["partials"][rank][call].float(), expected.float(), rtol=2**-6,
                                           atol=1e-4 if dtype == torch.float32 else 2**-3)


def test_a_gemv_output_of_minus_zero_was_sent(run):
    """The case the fused kernel must turn into +0.0 before it pushes (else it marks the slot empty
    and the finisher waits for it forever) did arise, and the sums above counted it."""
    if run["dtype"] == torch.bfloat16:
        partial = run["partials"][0][MINUS_ZERO][0, 0]
        assert partial == 0 and torch.signbit(partial)


def test_calls_leave_every_slot_empty_and_the_round_advanced(run):
    int_type, empty = EMPTY[run["dtype"]]
    for exchange, rounds in zip(run["exchanges"], run["rounds"]):
        assert torch.equal(exchange.view(int_type), torch.full_like(exchange.view(int_type), empty))
        assert rounds.tolist() == [KERNEL_CALLS % run["rounds_total"], 0]
