"""Vocabulary-parallel sampling's pick over peer memory, on CPU: three processes stand in for three
GPUs, each running `exchange_pick` in Triton's interpreter over exchange buffers in shared memory,
with every rank holding the candidates of its own vocabulary shard."""

import os

import pytest
import torch

import interpreter

interpreter.require_triton()

WORLD, SHARD = 3, 100_000
# (rows, chunks a row, programs): more calls than rounds, so slots are reused; a row of more chunks
# than one tile of the kernel; fewer programs than rows, so programs take several rows each (the
# interpreter runs programs one after another, so this cannot show that they send before waiting).
CALLS = [(1, 5, None), (4, 3, 2), (2, 130, None), (3, 1, 1), (1, 5, None)]


def _candidates(call: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s candidates of call `call`: scores [rows, chunks] drawn from a few values (ties
    within and across ranks), and columns increasing chunk by chunk inside the rank's shard."""
    rows, chunks, _ = CALLS[call]
    g = torch.Generator().manual_seed(100 * call + rank)
    scores = torch.randint(0, 4, (rows, chunks), generator=g).float()
    width = SHARD // chunks
    columns = rank * SHARD + torch.arange(chunks) * width + torch.randint(0, width, (rows, chunks), generator=g)
    return scores, columns.to(torch.int32)


def _rank(rank, exchanges, rounds, outputs):
    os.environ["TRITON_INTERPRET"] = "1"
    import interpreter

    assert interpreter.enable()
    from albireo.kernels.triton_all_reduce import ROUNDS, ExchangeSlots
    from albireo.kernels.triton_sampling import exchange_pick

    peers = torch.tensor([e.data_ptr() for e in exchanges], dtype=torch.int64)
    exchange = ExchangeSlots(peers, rounds[rank], exchanges[0].numel() // (ROUNDS * WORLD), rank)
    for call, (_, _, programs) in enumerate(CALLS):
        outputs[rank][call].copy_(exchange_pick(*_candidates(call, rank), exchange, max_programs=programs))


@pytest.fixture(scope="module")
def run():
    from albireo.kernels.triton_all_reduce import ROUNDS

    slot = max(rows * chunks for rows, chunks, _ in CALLS)
    exchanges = [torch.full((ROUNDS * WORLD * slot,), -1, dtype=torch.int64).share_memory_() for _ in range(WORLD)]
    rounds = [torch.zeros(2, dtype=torch.int32).share_memory_() for _ in range(WORLD)]
    outputs = [[torch.empty(rows, dtype=torch.int64).share_memory_() for rows, _, _ in CALLS] for _ in range(WORLD)]
    assert interpreter.spawn_ranks(_rank, WORLD, exchanges, rounds, outputs) == [0] * WORLD
    return dict(rounds_total=ROUNDS, exchanges=exchanges, rounds=rounds, outputs=outputs)


def test_every_rank_picks_the_best_score_and_the_first_column_among_ties(run):
    for call in range(len(CALLS)):
        parts = [_candidates(call, rank) for rank in range(WORLD)]
        scores = torch.cat([s for s, _ in parts], dim=1)
        columns = torch.cat([c for _, c in parts], dim=1).long()
        best = scores.max(dim=1, keepdim=True).values
        expected = torch.where(scores == best, columns, torch.iinfo(torch.int64).max).min(dim=1).values
        for rank in range(WORLD):
            assert run["outputs"][rank][call].tolist() == expected.tolist()


def test_calls_leave_every_slot_empty_and_the_round_advanced(run):
    for exchange, rounds in zip(run["exchanges"], run["rounds"]):
        assert torch.equal(exchange, torch.full_like(exchange, -1))
        assert rounds.tolist() == [len(CALLS) % run["rounds_total"], 0]
