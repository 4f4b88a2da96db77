"""The batch-1 GEMV kernel, on CPU through the Triton interpreter."""

import pytest
import torch
import torch.nn.functional as F

import interpreter

IN_PROCESS, interpreted, test_in_interpreter_subprocess = interpreter.kernel_test_module(__file__)
if IN_PROCESS:
    from albireo.kernels.triton_all_reduce import ExchangeSlots
    from albireo.kernels.triton_gemv import CONFIGS, gemv


def small(config):
    """A config with a K tile small enough for ragged K to cross several tiles."""
    block_n, _, warps, stages = config
    return block_n, 64, warps, stages


@interpreted
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_matches_torch_linear_with_ragged_n_and_k(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 300, generator=g), torch.randn(70, 300, generator=g)
    for config in CONFIGS:
        torch.testing.assert_close(gemv(x, w, config=small(config)), F.linear(x, w), rtol=1e-5, atol=1e-4)


@interpreted
def test_silu_mul_multiplies_silu_of_gate_by_up_before_the_product():
    g = torch.Generator().manual_seed(5)
    gate_up, w = torch.randn(2, 600, generator=g), torch.randn(40, 300, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    got = gemv(gate_up, w, silu_mul=True, config=small(CONFIGS[0]))
    torch.testing.assert_close(got, F.linear(F.silu(gate) * up, w), rtol=1e-5, atol=1e-4)


@interpreted
def test_bf16_result_is_within_one_bf16_step_of_the_fp32_product():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(1, 512, generator=g).bfloat16(), torch.randn(64, 512, generator=g).bfloat16()
    got = gemv(x, w, config=small(CONFIGS[0]))
    assert got.dtype == torch.bfloat16
    exact = F.linear(x.float(), w.float())
    # One step of bf16's 8-bit significand (the interpreter may truncate where the GPU rounds).
    torch.testing.assert_close(got.float(), exact, rtol=2**-7, atol=1e-6)


@interpreted
def test_more_rows_than_the_kernel_serves_are_refused():
    with pytest.raises(AssertionError):
        gemv(torch.randn(5, 64), torch.randn(8, 64))


@interpreted
def test_a_push_target_gets_the_product_in_this_ranks_slot_of_each_peers_current_round():
    """Rank 1 of 3 in round 2 of 3: each peer's buffer gets the product in slot 1 of round 2, with a
    -0.0 (the mark of an empty element) sent as +0.0; its own buffer and other slots stay empty."""
    rounds_n, world, slot, rank = 3, 3, 48, 1
    g = torch.Generator().manual_seed(7)
    # 3 rows and 15 outputs: the tiles' row and column masks both cut.
    x, w = torch.randn(3, 64, generator=g).bfloat16(), torch.randn(15, 64, generator=g).bfloat16()
    x[1] = 0.0
    x[1, 1], w[5, 1] = 2.0**-70, -(2.0**-70)  # y[1, 5] = -2^-140, which rounds to bf16's -0.0
    empty = torch.tensor(-0.0, dtype=torch.bfloat16).view(torch.int16)
    buffers = [torch.full((rounds_n * world * slot,), -0.0, dtype=torch.bfloat16) for _ in range(world)]
    peers = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    rounds = torch.tensor([2, 0], dtype=torch.int32)
    y = gemv(x, w, config=small(CONFIGS[0]), push=ExchangeSlots(peers, rounds, slot, rank))
    assert y[1, 5].view(torch.int16) == empty
    expected = torch.where(y == 0, 0.0, y).flatten().view(torch.int16)  # every zero as +0.0
    at = (2 * world + rank) * slot
    for r, buffer in enumerate(buffers):
        bits = buffer.view(torch.int16)
        written = bits[at : at + y.numel()]
        assert torch.equal(written, expected if r != rank else torch.full_like(written, empty.item()))
        assert (torch.cat([bits[:at], bits[at + y.numel() :]]) == empty).all()
