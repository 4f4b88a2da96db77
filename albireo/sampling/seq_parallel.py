"""Sequence-parallel sampling under tensor parallelism.

The LM head leaves each rank with a vocabulary shard of every row's logits, [B, V/t]. The usual
way (vLLM, SGLang) all-gathers them so every rank holds [B, V] and samples all B rows: t times the
sampling work and (t-1)/t of B*V logits received per rank. Here an all-to-all instead hands each
rank the full-vocabulary logits of its own B/t rows; it samples just those, and an all-gather of
B token ids (and logprobs, when asked) gives every rank the whole step's tokens. Sampling work and
logits traffic both divide by t.

When a batch's sampling is the one-pass Gumbel-max alone (no filter, penalty or logprobs: what
`SamplingMetadata.fused_alone` says), no logits move at all: each rank draws over its own
vocabulary shard, with the noise each column draws in an unsharded call, and an all-gather of
every row's best (score, column) per chunk, a few bytes a row where the all-to-all moves a whole
shard of it, lets every rank pick the same token (`vocab_parallel_gumbel`). On GPUs with peer
memory one kernel swaps the candidates and picks (`triton_sampling.exchange_pick`), where the
collective took a stack, NCCL's all-gather, a reorder and the pick.

A row's token depends only on its own logits and parameters (seeded rows draw from a per-row
stream), so the tokens are those of the all-gather path whichever rank samples the row.

Each rank draws random numbers only for its own rows, so the ranks' random states part ways. That
is harmless only because every token reaches every rank through the all-gather: a step that let
each rank sample unseeded rows by itself (the all-gather path) would then draw different tokens on
different ranks. A run therefore keeps one sampling path throughout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from albireo.distributed import parallel_state as ps
from albireo.sampling.sampler import Sampler, SamplerOutput, SamplingMetadata, SamplingRow
from albireo.sampling_params import SamplingParams

# Rows that pad the batch to a multiple of t: sampled greedily and thrown away.
_PADDING_ROW = SamplingRow(SamplingParams(temperature=0), [], [], [])


def rows_to_full_vocab(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B_pad, V/t] shards on every rank -> [B_pad/t, vocab_size] full rows for this rank's slice,
    in the shards' dtype."""
    t = ps.tp_size()
    rows, shard = local_logits.shape
    received = torch.empty_like(local_logits)
    # Chunk s of the rows goes to rank s; what arrives is this rank's rows, one vocab shard per rank.
    dist.all_to_all_single(received, local_logits.contiguous(), group=ps.tp_group())
    full = received.view(t, rows // t, shard).permute(1, 0, 2).reshape(rows // t, t * shard)
    return full[:, :vocab_size]


def _gather_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    return ps.tp_all_gather(x.contiguous(), dim=0)[:batch]


def vocab_parallel_gumbel(local_logits: torch.Tensor, metadata: SamplingMetadata, vocab_size: int) -> torch.Tensor:
    """Every row's token from the vocabulary shards [B, V/t] of its logits, for a batch that samples
    with the one-pass kernel alone. Seeded rows draw their unsharded draw; the others draw exactly
    from softmax(logits / T) too, whatever seed each rank gave them, as the noise stays independent
    across columns."""
    from albireo.kernels.triton_sampling import chunks_for, gumbel_candidates, pick_candidates

    t, rank = ps.tp_size(), ps.tp_rank()
    batch, shard = local_logits.shape
    lo = rank * shard
    # The same number of chunks on every rank (from the shard's width), so that the candidates stack.
    num_chunks = chunks_for(batch, shard)
    scores, indices = gumbel_candidates(local_logits, metadata.fused_temperature, metadata.fused_seeds, lo,
                                        min(lo + shard, vocab_size), num_chunks)
    picked = ps.tp_pick_candidates(scores, indices)  # one kernel over peer memory, where GPUs have it
    if picked is not None:
        return picked
    # One collective for both: the columns travel as the bits of float32s.
    mine = torch.stack([scores, indices.view(torch.float32)])
    # Gathered as ranks' tensors end to end along the first dimension (gloo takes no other layout).
    gathered = torch.empty((t * mine.shape[0], *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
    dist.all_gather_into_tensor(gathered, mine, group=ps.tp_group())
    stacked = torch.cat(gathered.view(t, *mine.shape).unbind(0), dim=2)  # [2, B, t * C], chunks in column order
    return pick_candidates(stacked[0], stacked[1].contiguous().view(torch.int32))


def seq_parallel_sample(
    sampler: Sampler, local_logits: torch.Tensor, rows: list[SamplingRow], vocab_size: int,
    metadata: SamplingMetadata | None = None,
) -> SamplerOutput:
    """Sample every row of a TP batch, each rank doing 1/t of them; every rank gets all tokens.
    `metadata`, of all the rows, lets a batch that samples with the one-pass kernel alone take
    `vocab_parallel_gumbel`."""
    if metadata is not None and metadata.fused_alone:
        return SamplerOutput(vocab_parallel_gumbel(local_logits, metadata, vocab_size), None, None, None)
    t, rank = ps.tp_size(), ps.tp_rank()
    batch = len(rows)
    per_rank = -(-batch // t)
    padding = per_rank * t - batch
    if padding:
        local_logits = torch.nn.functional.pad(local_logits, (0, 0, 0, padding))
    logits = rows_to_full_vocab(local_logits, vocab_size)
    mine = rows[rank * per_rank : (rank + 1) * per_rank]
    mine += [_PADDING_ROW] * (per_rank - len(mine))
    requested = [r.params.logprobs for r in rows if r.params.logprobs is not None]
    metadata = SamplingMetadata.build(mine, vocab_size, logits.device, num_logprobs=max(requested, default=None))
    out = sampler(logits, metadata)
    if out.logprobs is None:
        return SamplerOutput(_gather_rows(out.sampled_token_ids, batch), None, None, None)
    return SamplerOutput(*(_gather_rows(x, batch) for x in
                           (out.sampled_token_ids, out.logprob_token_ids, out.logprobs, out.sampled_ranks)))
