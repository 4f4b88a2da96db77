"""How the copy-engine all-reduce splits rows between two ranks, what each rank makes of its rows,
and its size threshold. The copies and flags need two GPUs (tests/device/test_symm_all_reduce.py
and test_e2e_gpu.py); here two threads stand in for the ranks and queues for the copies."""

import collections
import queue
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from albireo.distributed.copy_engine_all_reduce import (
    SplitSum,
    above_bytes_from_env,
    split_rows,
)
from albireo.layers.linear import SplitRows
from albireo.layers.norm import RMSNorm


@pytest.mark.parametrize("rows", [16384, 1001, 2])
def test_the_two_ranks_own_every_row_once(rows):
    (own0, peer0), (own1, peer1) = split_rows(rows, 0), split_rows(rows, 1)
    assert own0 == peer1 and own1 == peer0
    assert own0[0] == 0 and own0[1] == own1[0] and own1[1] == rows


def test_rank_0_owns_the_smaller_half_of_odd_rows():
    assert split_rows(7, 0) == ((0, 3), (3, 7))
    assert split_rows(7, 1) == ((3, 7), (0, 3))


def test_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", "0")
    assert above_bytes_from_env() == 0
    monkeypatch.delenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES")
    assert above_bytes_from_env() == 32 * 2**20


def test_a_threshold_that_is_not_a_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", "8MiB")
    with pytest.raises(ValueError, match=r"ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES must be a whole number of bytes, got '8MiB'"):
        above_bytes_from_env()


class _QueueEngine:
    """The part of CopyEngineAllReduce that SplitSum uses, with a queue per peer region for the copy."""

    dtype = torch.float32

    def __init__(self, rank: int, inboxes: list) -> None:
        self.rank, self.inboxes = rank, inboxes

    def send(self, rows: torch.Tensor, slot: int, part: int) -> None:
        self.inboxes[1 - self.rank][slot, part].put(rows.clone())

    def receive_rows(self, slot: int, part: int, shape: tuple[int, int]) -> torch.Tensor:
        rows = self.inboxes[self.rank][slot, part].get(timeout=10)
        assert rows.shape == shape
        return rows


def _split_sums(rows: int, features: int = 8) -> tuple[list[SplitSum], torch.Tensor]:
    """Both ranks' SplitSums of a row-parallel product (each already sent the peer's rows, as
    `CopyEngineAllReduce.linear` does), and the sum they stand for."""
    gen = torch.Generator().manual_seed(rows)
    parts = [torch.randn(rows, features, generator=gen) for _ in range(2)]
    inboxes = [collections.defaultdict(queue.Queue) for _ in range(2)]
    sums = []
    for rank, mine in enumerate(parts):
        engine = _QueueEngine(rank, inboxes)
        own, peer = split_rows(rows, rank)
        engine.send(mine[peer[0] : peer[1]], 0, part=0)
        sums.append(SplitSum(engine, 0, mine.clone(), own, peer))
    return sums, parts[0] + parts[1]


def _on_both_ranks(fn, items: list) -> list:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(fn, items))


def _torch_rms_norm(x, weight, eps, residual, addend):
    """triton_fused.rms_norm's contract (x + addend + residual, written into residual) in torch."""
    residual.copy_(x + addend + residual)
    return weight * residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps), residual


@pytest.mark.parametrize("rows", [7, 2])
def test_both_ranks_get_every_row_of_the_sum(rows):
    sums, expected = _split_sums(rows)
    for total in _on_both_ranks(SplitSum.total, sums):
        torch.testing.assert_close(total, expected)


@pytest.fixture
def torch_norm(monkeypatch):
    from albireo.kernels import triton_fused

    monkeypatch.setattr(triton_fused, "rms_norm", _torch_rms_norm)
    norm = RMSNorm(8, 1e-5)
    norm.weight.data = torch.linspace(0.5, 1.5, 8)
    return norm


def test_each_rank_normalizes_its_own_rows_and_gets_the_peer_s(torch_norm):
    sums, total = _split_sums(7)
    residual = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    split = [SplitRows(s, torch_norm, residual.clone()) for s in sums]
    outs = _on_both_ranks(SplitRows.whole, split)
    expected, summed = torch_norm(total, residual.clone())
    for out, rows in zip(outs, split):
        torch.testing.assert_close(out, expected)
        lo, hi = rows.sum.own
        torch.testing.assert_close(rows.residual[lo:hi], summed[lo:hi])  # only its own rows are summed
        assert torch.equal(rows.residual[rows.sum.peer[0] : rows.sum.peer[1]], residual[rows.sum.peer[0] : rows.sum.peer[1]])


def test_the_next_layer_multiplies_every_normalized_row(torch_norm):
    sums, total = _split_sums(7)
    residual = torch.randn(7, 8, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    split = [SplitRows(s, torch_norm, residual.clone()) for s in sums]
    outs = _on_both_ranks(lambda rows: rows.multiply(weight, None), split)
    expected = torch_norm(total, residual.clone())[0] @ weight.t()
    for out in outs:
        torch.testing.assert_close(out, expected)
