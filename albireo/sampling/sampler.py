"""Turns a batch of logits into next tokens, following the order of vLLM v1's sampler.

Per step, for the rows that need each stage:
  1. raw logprobs (log_softmax of the untouched logits), when any row asked for logprobs;
  2. min_tokens: EOS and stop ids get -inf until the row has generated enough tokens;
  3. repetition, frequency and presence penalties;
  4. greedy rows take the argmax here;
  5. sampled rows: temperature, min_p, top_k, top_p, then an exponential race;
  6. logprobs of the sampled token and the top K, plus the sampled token's rank.

Everything that depends on the batch's parameters is gathered once into SamplingMetadata, on the
device, so forward() only runs tensor code; the one Python loop left is over seeded rows, each of
which must draw its noise from its own generator.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch

from albireo import kernels
from albireo.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1

# The per-row parameters SamplingMetadata.build reads, one column each of its table.
_COLUMNS = (
    "greedy", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
    "presence_penalty", "seeded", "logprobs", "min_tokens",
)


def _columns_of(p: SamplingParams) -> tuple:
    return (
        p.greedy, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty,
        p.presence_penalty, p.seed is not None, -1 if p.logprobs is None else p.logprobs, p.min_tokens,
    )


@dataclass
class SamplingRow:
    """One sequence that samples a token this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    # Tokens generated so far, before this step.
    output_token_ids: list[int]
    # The model's EOS ids; blocked by min_tokens unless params.ignore_eos.
    eos_token_ids: list[int]
    # How many tokens the row has generated, when more than output_token_ids holds: under async
    # scheduling the previous step's token may still be on its way to the host.
    num_generated: int | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) if self.num_generated is None else self.num_generated


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # [B, K+1] int64: column 0 is the sampled token, then the top K by descending logprob.
    logprob_token_ids: torch.Tensor | None
    logprobs: torch.Tensor | None  # [B, K+1] float32, matching logprob_token_ids
    sampled_ranks: torch.Tensor | None  # [B] int64, 1 = most likely


@dataclass
class SamplingMetadata:
    """The batch's sampling parameters as device tensors.

    An optional field is None when no row needs that stage, which is how forward() knows to skip
    it. Per-row values that mean "off" are stored as neutral values (top_k = vocab_size,
    top_p = 1, min_p = 0, penalties 1/0/0) so a batch mixing on and off rows needs no masking.
    """

    vocab_size: int
    # [B] float32; greedy rows hold 1.0 so the division is harmless (their token comes from argmax).
    temperature: torch.Tensor
    all_greedy: bool
    all_random: bool
    # [B] bool, only for a batch that mixes greedy and sampled rows.
    greedy_mask: torch.Tensor | None
    # Filters, only when some sampled row uses them.
    top_k: torch.Tensor | None  # [B] int64 in [1, vocab_size]
    # Largest top_k among rows that use it, so a batch without top_p can run a partial topk.
    max_top_k: int
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    # Penalties, only when some row uses them.
    repetition_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None  # [B] float32
    # [B, L] int64 padded with vocab_size. Prompt ids only feed the repetition penalty; output ids
    # feed all three penalties.
    prompt_token_ids: torch.Tensor | None
    output_token_ids: torch.Tensor | None
    # (row indices, token ids), both [N] int64: the logits that min_tokens sets to -inf.
    min_tokens_block: tuple[torch.Tensor, torch.Tensor] | None
    # Row index -> generator already seeded for this step, for seeded sampled rows.
    generators: dict[int, torch.Generator]
    # Largest params.logprobs in the batch; None when no row asked.
    max_num_logprobs: int | None
    # One-pass Gumbel sampling (CUDA): per-row temperature with 0 for greedy, per-row Philox
    # seeds, and which rows still need the filtering path (top-k/top-p/min-p), None if none do.
    fused_temperature: torch.Tensor | None = None
    fused_seeds: torch.Tensor | None = None
    filtered_rows: torch.Tensor | None = None
    # Whether the same rows' next step may reuse this metadata (`for_next_step`): true when nothing
    # in it depends on the step, i.e. no seeded sampled row, no penalty, no min_tokens block.
    reusable: bool = False

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @property
    def fused_alone(self) -> bool:
        """Whether the one-pass kernel is the whole pipeline: it runs here (CUDA, fused kernels, a row
        that samples), and no filter, penalty, min_tokens or logprobs follows it."""
        return (self.fused_seeds is not None and self.filtered_rows is None and self.max_num_logprobs is None
                and self.min_tokens_block is None and self.output_token_ids is None)

    def for_next_step(self) -> SamplingMetadata:
        """This metadata for the same rows one step later (only valid when `reusable`)."""
        assert self.reusable
        if self.fused_seeds is None:
            return self
        seeds = torch.randint(0, 1 << 62, self.fused_seeds.shape, dtype=torch.int64, device=self.fused_seeds.device)
        return dataclasses.replace(self, fused_seeds=seeds)

    @classmethod
    def build(
        cls, rows: list[SamplingRow], vocab_size: int, device: torch.device, num_logprobs: int | None = None
    ) -> SamplingMetadata:
        """`num_logprobs` overrides the batch's largest logprobs count (ranks sampling slices of one
        batch must all return as many columns).

        One pass over the rows gathers their parameters into a table (rows of a batch mostly share
        one SamplingParams, read once); everything else is numpy over its columns. Only rows with a
        seed, min_tokens or penalties are visited again.
        """
        device = torch.device(device)
        # Each distinct SamplingParams is read once; rows point at its line of the table.
        index: dict[int, int] = {}
        distinct: list[tuple] = []
        which = np.empty(len(rows), dtype=np.int64)
        for i, row in enumerate(rows):
            p = row.params
            j = index.get(id(p))
            if j is None:
                j = index[id(p)] = len(distinct)
                distinct.append(_columns_of(p))
            which[i] = j
        table = np.array(distinct, dtype=np.float64).reshape(len(distinct), len(_COLUMNS))[which]
        col = dict(zip(_COLUMNS, table.T))
        greedy = col["greedy"] != 0
        temp, k, top_p_col, min_p_col = col["temperature"], col["top_k"], col["top_p"], col["min_p"]
        sampled = ~greedy
        all_greedy, all_random = bool(greedy.all()), not greedy.any()

        def floats(values: np.ndarray) -> torch.Tensor:
            return to_device(values, torch.float32, device)

        temperature = floats(np.where(greedy, 1.0, temp))
        greedy_mask = None
        if not all_greedy and not all_random:
            greedy_mask = to_device(greedy, torch.bool, device)

        # Filters are irrelevant to greedy rows, so those rows never switch a filter on.
        uses_top_k = sampled & (k > 0) & (k < vocab_size)
        uses_top_p, uses_min_p = sampled & (top_p_col < 1.0), sampled & (min_p_col > 0.0)
        top_k = top_p = min_p = None
        max_top_k = vocab_size
        if uses_top_k.any():
            max_top_k = int(k[uses_top_k].max())
            top_k = to_device(np.where(uses_top_k, k, vocab_size), torch.int64, device)
        if uses_top_p.any():
            top_p = floats(np.where(greedy, 1.0, top_p_col))
        if uses_min_p.any():
            min_p = floats(np.where(greedy, 0.0, min_p_col))

        repetition_penalty = frequency_penalty = presence_penalty = None
        prompt_token_ids = output_token_ids = None
        if (col["repetition_penalty"] != 1.0).any():
            repetition_penalty = floats(col["repetition_penalty"])
            prompt_token_ids = _pad_ids([row.prompt_token_ids for row in rows], vocab_size, device)
        if (col["frequency_penalty"] != 0.0).any():
            frequency_penalty = floats(col["frequency_penalty"])
        if (col["presence_penalty"] != 0.0).any():
            presence_penalty = floats(col["presence_penalty"])
        if repetition_penalty is not None or frequency_penalty is not None or presence_penalty is not None:
            output_token_ids = _pad_ids([row.output_token_ids for row in rows], vocab_size, device)

        block_rows: list[int] = []
        block_ids: list[int] = []
        for i in np.flatnonzero(col["min_tokens"] > 0).tolist():
            row = rows[i]
            p = row.params
            if row.num_output_tokens >= p.min_tokens:
                continue
            blocked = set(p.stop_token_ids)
            if not p.ignore_eos:
                blocked.update(row.eos_token_ids)
            # An id outside the vocabulary can never be sampled, so there is nothing to block.
            blocked = sorted(t for t in blocked if 0 <= t < vocab_size)
            block_rows.extend([i] * len(blocked))
            block_ids.extend(blocked)
        min_tokens_block = None
        if block_ids:
            min_tokens_block = (
                to_device(block_rows, torch.int64, device),
                to_device(block_ids, torch.int64, device),
            )

        has_seed = col["seeded"] != 0
        seeded_rows = np.flatnonzero(has_seed & sampled).tolist()
        generators: dict[int, torch.Generator] = {}
        for i in seeded_rows:
            gen = torch.Generator(device=device)
            gen.manual_seed(step_seed(rows[i].params.seed, rows[i].num_output_tokens))
            generators[i] = gen

        logprobs = col["logprobs"]
        max_num_logprobs = min(int(logprobs.max()), vocab_size) if (logprobs >= 0).any() else None
        if num_logprobs is not None:
            max_num_logprobs = min(num_logprobs, vocab_size)

        fused_temperature = fused_seeds = filtered_rows = None
        if device.type == "cuda" and kernels.use_fused and not all_greedy:
            fused_temperature = floats(np.where(greedy, 0.0, temp))
            seeds = [random.getrandbits(63) for _ in rows]
            for i in np.flatnonzero(has_seed).tolist():
                seeds[i] = step_seed(rows[i].params.seed, rows[i].num_output_tokens) >> 1
            fused_seeds = to_device(seeds, torch.int64, device)
            filters = uses_top_k | uses_top_p | uses_min_p
            if filters.any():
                filtered_rows = to_device(filters, torch.bool, device)

        return cls(
            vocab_size=vocab_size,
            temperature=temperature,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=greedy_mask,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids,
            min_tokens_block=min_tokens_block,
            generators=generators,
            max_num_logprobs=max_num_logprobs,
            fused_temperature=fused_temperature,
            fused_seeds=fused_seeds,
            filtered_rows=filtered_rows,
            reusable=not seeded_rows and output_token_ids is None and min_tokens_block is None,
        )


def _pad_ids(seqs: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    padded = [list(s) + [pad_id] * (width - len(s)) for s in seqs]
    return to_device(padded, torch.int64, device).view(len(seqs), width)


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or array as a device tensor; on CUDA through pinned memory, so the copy waits for nothing."""
    host = torch.as_tensor(values).to(dtype) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, num_output_tokens: int) -> int:
    """The generator seed for a seeded row's draw at a given output length.

    Deriving it from (seed, step) rather than carrying generator state from step to step keeps a
    seeded request reproducible when it is preempted and recomputed, and independent of whatever
    else shares its batch. Hashing both parts keeps nearby (seed, step) pairs from sharing streams.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (num_output_tokens & _MASK64))


def apply_min_tokens(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Block EOS and stop ids for rows that have not yet generated min_tokens tokens."""
    if metadata.min_tokens_block is None:
        return logits
    return logits.index_put(metadata.min_tokens_block, torch.full((), float("-inf"), device=logits.device))


def _occurrences(ids: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-row counts of each token id in padded `ids`, as a [B, vocab_size] tensor."""
    # The padding id is vocab_size, so its counts land in one extra column that is then dropped.
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=dtype, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=dtype))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt or output), frequency and presence (output only) penalties."""
    if metadata.output_token_ids is None:
        return logits
    vocab_size = logits.shape[1]
    output_counts = _occurrences(metadata.output_token_ids, vocab_size, logits.dtype)
    in_output = output_counts > 0

    if metadata.repetition_penalty is not None:
        assert metadata.prompt_token_ids is not None
        seen = in_output | (_occurrences(metadata.prompt_token_ids, vocab_size, logits.dtype) > 0)
        penalty = torch.where(seen, metadata.repetition_penalty.unsqueeze(1), 1.0)
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if metadata.frequency_penalty is not None:
        logits = logits - metadata.frequency_penalty.unsqueeze(1) * output_counts
    if metadata.presence_penalty is not None:
        logits = logits - metadata.presence_penalty.unsqueeze(1) * in_output.to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's largest probability."""
    # p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p): no softmax needed, and
    # log(0) = -inf keeps rows with min_p = 0 untouched.
    max_logit = logits.amax(dim=1, keepdim=True)
    drop = (logits - max_logit) < torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(drop, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int
) -> torch.Tensor:
    """Keep each row's top_k largest logits, then its smallest nucleus reaching top_p.

    Ties with the k-th largest logit are all kept.
    """
    if top_k is None and top_p is None:
        return logits
    if top_p is None:
        # Only the k-th largest value per row matters, so a partial topk beats a full sort.
        assert top_k is not None
        largest = logits.topk(max_top_k, dim=1).values
        kth = largest.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
        # Rows with top_k off (stored as vocab_size) lie beyond the partial topk; keep all of theirs.
        kth = kth.masked_fill((top_k >= logits.shape[1]).unsqueeze(1), float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))

    sorted_logits, order = logits.sort(dim=1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=1)
    # A token stays if the more likely tokens before it have not reached top_p yet; the first
    # token always stays. Rows with top_p = 1 are exempt so rounding in the cumsum cannot cut
    # their tail.
    mass_before = probs.cumsum(dim=1) - probs
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One token per row with probability probs, via argmax(probs / q), q ~ Exponential(1).

    The race needs no cumulative sums and no host sync, and each row's noise can come from its
    own generator.
    """
    batch_size, vocab_size = probs.shape
    noise = torch.empty_like(probs)
    if len(generators) < batch_size:
        noise.exponential_()
    for i, gen in generators.items():
        noise[i] = torch.empty(vocab_size, dtype=probs.dtype, device=probs.device).exponential_(generator=gen)
    # A zero draw would turn a filtered token's 0 / 0 into NaN, which argmax would pick.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=1)


def gather_logprobs(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, num_logprobs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled token and the top num_logprobs tokens with their logprobs, and the sampled rank.

    Rank counts the tokens at least as likely as the sampled one (as vLLM does), so a tie with
    another token pushes the rank down.
    """
    top_logprobs, top_ids = raw_logprobs.topk(num_logprobs, dim=1)
    sampled = sampled.unsqueeze(1)
    sampled_logprob = raw_logprobs.gather(1, sampled)
    ranks = (raw_logprobs >= sampled_logprob).sum(dim=1)
    token_ids = torch.cat([sampled, top_ids], dim=1)
    logprobs = torch.cat([sampled_logprob, top_logprobs], dim=1)
    return token_ids, logprobs, ranks


class Sampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of logits [B, vocab_size]; the input tensor is not modified."""
        assert logits.shape[1] == metadata.vocab_size, (
            f"logits have {logits.shape[1]} columns, metadata expects vocab_size={metadata.vocab_size}"
        )
        if metadata.fused_alone:
            from albireo.kernels.triton_sampling import gumbel_sample

            # The kernel widens each logit to float32 as it reads it: no float32 copy of [B, V].
            return SamplerOutput(gumbel_sample(logits, metadata.fused_temperature, metadata.fused_seeds),
                                 None, None, None)
        logits = logits.float()
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=1)

        logits = apply_min_tokens(logits, metadata)
        logits = apply_penalties(logits, metadata)

        greedy = None if metadata.all_random or metadata.fused_seeds is not None else logits.argmax(dim=1)
        if metadata.all_greedy:
            sampled = greedy
        elif metadata.fused_seeds is not None:
            from albireo.kernels.triton_sampling import gumbel_sample

            sampled = gumbel_sample(logits, metadata.fused_temperature, metadata.fused_seeds)
            if metadata.filtered_rows is not None:
                sampled = torch.where(metadata.filtered_rows, self._sample(logits, metadata), sampled)
        else:
            sampled = self._sample(logits, metadata)
            if greedy is not None:
                sampled = torch.where(metadata.greedy_mask, greedy, sampled)

        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        token_ids, logprobs, ranks = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, token_ids, logprobs, ranks)

    @staticmethod
    def _sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        logits = logits / metadata.temperature.unsqueeze(1)
        if metadata.min_p is not None:
            logits = apply_min_p(logits, metadata.min_p)
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p, metadata.max_top_k)
        return random_sample(logits.softmax(dim=1), metadata.generators)
