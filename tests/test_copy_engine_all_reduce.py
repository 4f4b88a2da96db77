"""How the copy-engine all-reduce splits rows between the ranks, what each rank makes of its rows,
and its size threshold. The copies and flags need GPUs (tests/device/test_symm_all_reduce.py and
test_e2e_gpu.py); here threads stand in for the ranks, shared tensors for the receive regions and
queues for the flags."""

import collections
import itertools
import queue
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from albireo.distributed.copy_engine_all_reduce import (
    CopyEngineAllReduce,
    SplitSum,
    above_bytes_from_env,
    fits_region,
    peers_from,
    region_numel,
    row_runs,
)
from albireo.layers.linear import SplitRows
from albireo.layers.norm import RMSNorm


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("rows", [16384, 1001, 4])
def test_the_ranks_own_every_row_once_in_order(rows, world):
    runs = row_runs(rows, world)
    assert runs[0][0] == 0 and runs[-1][1] == rows
    assert all(hi == next_lo for (_, hi), (next_lo, _) in itertools.pairwise(runs))
    assert max(hi - lo for lo, hi in runs) - min(hi - lo for lo, hi in runs) <= 1


def test_rank_0_owns_the_smaller_half_of_odd_rows():
    assert row_runs(7, 2) == [(0, 3), (3, 7)]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_at_each_turn_every_rank_sends_to_a_different_peer(world):
    turns = list(zip(*(peers_from(rank, world) for rank in range(world))))
    assert all(sorted(turn) == list(range(world)) for turn in turns)
    assert all(rank not in peers_from(rank, world) for rank in range(world))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_a_region_holds_every_product_up_to_the_largest(world):
    numel = region_numel(16384 * 4096, world)
    assert all(fits_region(rows, 4096, world, numel) for rows in range(16384 - 2 * world, 16385))
    assert fits_region(1001, 128 * 1024, world, region_numel(1001 * 128 * 1024, world))
    assert numel < 16384 * 4096 * (world - 1) / world + world * 2**17


def test_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", "0")
    assert above_bytes_from_env(4) == 0


def test_the_threshold_grows_with_the_ranks(monkeypatch):
    monkeypatch.delenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", raising=False)
    assert above_bytes_from_env(2) == 32 * 2**20
    assert above_bytes_from_env(4) == 64 * 2**20


def test_a_threshold_that_is_not_a_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES", "8MiB")
    with pytest.raises(ValueError, match=r"ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES must be a whole number of bytes, got '8MiB'"):
        above_bytes_from_env(2)


class _QueueEngine:
    """CopyEngineAllReduce's row-parallel product and exchange, with every rank's receive regions
    in shared tensors and a queue per region for the flags."""

    dtype = torch.float32
    linear = CopyEngineAllReduce.linear

    def __init__(self, rank: int, world: int, regions: list, flags: list) -> None:
        self.rank, self.world, self.peers = rank, world, peers_from(rank, world)
        self.regions, self.flags, self.calls = regions, flags, 0

    def send(self, main: int, rows: torch.Tensor, slot: int, part: int, offsets: dict[int, int]) -> None:
        for peer, offset in offsets.items():
            self.regions[peer][slot, part, offset : offset + rows.numel()] = rows.flatten()
            self.flags[peer][slot, part].put(self.rank)

    def receive_region(self, main: int, slot: int, part: int) -> torch.Tensor:
        senders = sorted(self.flags[self.rank][slot, part].get(timeout=10) for _ in self.peers)
        assert senders == sorted(self.peers)
        return self.regions[self.rank][slot, part]


@pytest.fixture(autouse=True)
def _no_cuda_stream(monkeypatch):
    """linear asks torch for the current stream's handle, which the queue engine only passes on."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=0))


def _split_sums(rows: int, world: int, features: int = 8) -> tuple[list[SplitSum], torch.Tensor]:
    """Every rank's SplitSum of a row-parallel layer (its product made, the peers' rows of it sent),
    and the sum they stand for."""
    gen = torch.Generator().manual_seed(rows * world)
    xs = [torch.randn(rows, 6, generator=gen) for _ in range(world)]
    weights = [torch.randn(features, 6, generator=gen) for _ in range(world)]
    regions = [torch.full((2, 2, rows * features), float("nan")) for _ in range(world)]
    flags = [collections.defaultdict(queue.Queue) for _ in range(world)]
    engines = [_QueueEngine(rank, world, regions, flags) for rank in range(world)]
    sums = [engine.linear(x, w) for engine, x, w in zip(engines, xs, weights)]
    return sums, sum(x @ w.t() for x, w in zip(xs, weights))


def _on_every_rank(fn, items: list) -> list:
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def _torch_rms_norm(x, weight, eps, residual, addend):
    """triton_fused.rms_norm's contract (x + the addends + residual, written into residual) in torch."""
    residual.copy_(x + addend.sum(0) + residual)
    return weight * residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps), residual


@pytest.mark.parametrize("world,rows", [(2, 7), (2, 2), (3, 10), (4, 4), (4, 1001)])
def test_every_rank_gets_every_row_of_the_sum(world, rows):
    sums, expected = _split_sums(rows, world)
    for total in _on_every_rank(SplitSum.total, sums):
        torch.testing.assert_close(total, expected)


@pytest.fixture
def torch_norm(monkeypatch):
    from albireo.kernels import triton_fused

    monkeypatch.setattr(triton_fused, "rms_norm", _torch_rms_norm)
    norm = RMSNorm(8, 1e-5)
    norm.weight.data = torch.linspace(0.5, 1.5, 8)
    return norm


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_normalizes_its_own_rows_and_gets_the_peers(torch_norm, world):
    sums, total = _split_sums(7, world)
    residual = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    split = [SplitRows(s, torch_norm, residual.clone()) for s in sums]
    outs = _on_every_rank(SplitRows.whole, split)
    expected, summed = torch_norm(total, residual.clone())
    for out, rows in zip(outs, split):
        torch.testing.assert_close(out, expected)
        lo, hi = rows.sum.own
        torch.testing.assert_close(rows.residual[lo:hi], summed[lo:hi])  # only its own rows are summed
        others = torch.ones(7, dtype=torch.bool)
        others[lo:hi] = False
        assert torch.equal(rows.residual[others], residual[others])


@pytest.mark.parametrize("world", [2, 3])
def test_the_next_layer_multiplies_every_normalized_row(torch_norm, world):
    sums, total = _split_sums(7, world)
    residual = torch.randn(7, 8, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    split = [SplitRows(s, torch_norm, residual.clone()) for s in sums]
    outs = _on_every_rank(lambda rows: rows.multiply(weight, None), split)
    expected = torch_norm(total, residual.clone())[0] @ weight.t()
    for out in outs:
        torch.testing.assert_close(out, expected)
