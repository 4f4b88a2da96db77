"""The one-pass Gumbel sampling kernel, on CPU through the Triton interpreter."""

import torch

import interpreter

IN_PROCESS, interpreted, test_in_interpreter_subprocess = interpreter.kernel_test_module(__file__)
if IN_PROCESS:
    from albireo.kernels.triton_sampling import chunks_for, gumbel_candidates, gumbel_sample, pick_candidates


def seeds(n: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64) * 7919 + 12345


@interpreted
def test_temperature_zero_is_argmax_with_first_index_on_ties():
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(0))
    logits[2, 17] = logits[2, 2100] = 50.0  # a tie: the first index wins, as with torch.argmax
    out = gumbel_sample(logits, torch.zeros(6), seeds(6))
    assert out.tolist() == logits.argmax(dim=1).tolist()


@interpreted
def test_same_seed_same_token_wherever_the_row_sits():
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(1)).expand(4, -1).contiguous()
    s = torch.tensor([5, 6, 5, 7], dtype=torch.int64)
    out = gumbel_sample(logits, torch.ones(4), s)
    assert out[0] == out[2]
    alone = gumbel_sample(logits[:1], torch.ones(1), s[:1])
    assert alone[0] == out[0]


@interpreted
def test_a_row_draws_the_same_token_whether_its_logits_are_split_or_not():
    # Alone, a row's 5000 logits are split over five programs; in a batch of 512 rows or more each
    # row is one program's (`chunks_for`), which num_chunks=1 stands in for with three rows.
    assert (chunks_for(1, 5000), chunks_for(600, 5000)) == (5, 1)
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(2))
    logits[0, 10] = logits[0, 4500] = 60.0  # a tie across chunks: the first index wins
    temperature, s = torch.tensor([0.0, 1.0, 1.0]), seeds(3)
    whole = pick_candidates(*gumbel_candidates(logits, temperature, s, num_chunks=1))
    for row in range(3):
        alone = gumbel_sample(logits[row : row + 1].clone(), temperature[row : row + 1], s[row : row + 1])
        assert alone.item() == whole[row].item()
    assert whole[0].item() == 10


@interpreted
def test_vocabulary_shards_pick_the_token_the_whole_row_draws():
    """Under TP each rank holds a shard of the columns (the last one padded past the vocabulary);
    their candidates, stacked in rank order, pick what one call over all the logits draws."""
    vocab, shard = 5000, 2600  # shard boundaries off the kernel's 1024-column blocks
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(4))
    logits[0, 2599] = logits[0, 2600] = 40.0  # a tie across the shards: the first column wins
    temperature, s = torch.tensor([0.0, 1.0, 0.8]), seeds(3)
    padded = torch.cat([logits, torch.full((3, 2 * shard - vocab), 1e4)], dim=1)  # padding must never win
    parts = [gumbel_candidates(padded[:, lo : lo + shard].contiguous(), temperature, s, lo, min(lo + shard, vocab),
                               num_chunks=2) for lo in (0, shard)]
    picked = pick_candidates(*(torch.cat(columns, dim=1) for columns in zip(*parts)))
    assert picked.tolist() == gumbel_sample(logits, temperature, s).tolist()
    assert picked[0].item() == 2599


@interpreted
def test_more_chunks_than_one_tile_of_the_picking_kernel_pick_the_argmax():
    logits = torch.randn(3, 200_000, generator=torch.Generator().manual_seed(5))  # 196 chunks a row
    logits[0, 5] = logits[0, 150_000] = 50.0  # tied across tiles: the first column wins
    logits[1, 190_000] = 50.0  # the maximum in the second tile
    out = gumbel_sample(logits, torch.zeros(3), seeds(3))
    assert out.tolist() == [5, 190_000, int(logits[2].argmax())]


def _vocab_parallel_rank(rank, port, logits, temperature, seed_values, out):
    import dataclasses

    from albireo.distributed import parallel_state as ps
    from albireo.sampling.sampler import SamplingMetadata, SamplingRow
    from albireo.sampling.seq_parallel import vocab_parallel_gumbel
    from albireo.sampling_params import SamplingParams

    ps.init_distributed(rank, 2, ps.Rendezvous("127.0.0.1", port), "gloo")
    batch, vocab = logits.shape
    shard = -(-vocab // 2)
    # The LM head's last shard is padded past the vocabulary; the padding must never win.
    padded = torch.cat([logits, torch.full((batch, 2 * shard - vocab), 1e4)], dim=1)
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [], []) for _ in range(batch)]
    metadata = dataclasses.replace(SamplingMetadata.build(rows, vocab, torch.device("cpu")),
                                   fused_temperature=temperature, fused_seeds=seed_values)
    out[rank].copy_(vocab_parallel_gumbel(padded[:, rank * shard : (rank + 1) * shard].contiguous(), metadata, vocab))
    ps.shutdown_distributed()


@interpreted
def test_two_ranks_sampling_their_vocabulary_shards_give_every_rank_the_unsharded_tokens():
    from albireo.executor.executor import free_port

    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(6))
    temperature, s = torch.tensor([0.0, 1.0, 0.7, 1.3]), seeds(4)
    out = torch.zeros(2, 4, dtype=torch.int64).share_memory_()
    assert interpreter.spawn_ranks(_vocab_parallel_rank, 2, free_port(), logits, temperature, s, out) == [0, 0]
    expected = gumbel_sample(logits, temperature, s).tolist()
    assert out[0].tolist() == expected and out[1].tolist() == expected


@interpreted
def test_a_row_of_only_minus_infinity_gives_column_zero_like_argmax():
    logits = torch.full((1, 3000), float("-inf"))
    assert gumbel_sample(logits, torch.ones(1), seeds(1)).item() == 0


@interpreted
def test_draws_follow_softmax_of_logits_over_temperature():
    temperature = 0.7
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")])
    rows = 600  # sampling error of a frequency: at most 0.02 (one sigma)
    out = gumbel_sample(base.expand(rows, -1).contiguous(), torch.full((rows,), temperature), seeds(rows))
    freq = torch.bincount(out, minlength=6).float() / rows
    expected = torch.softmax(base / temperature, dim=0)
    assert freq[5] == 0  # a -inf logit is never drawn
    torch.testing.assert_close(freq, expected, atol=0.05, rtol=0)
