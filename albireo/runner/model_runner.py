"""Runs one scheduled step on one device: flat inputs in, sampled tokens out.

The runner keeps its own copy of every running request's tokens and blocks, updated from each
step plan, so a plan carries only what changed (new requests, new blocks, finished ids) and the
tokens the runner sampled itself never have to come back from the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from albireo.config import EngineConfig
from albireo.core.scheduler import NewRequestData, SampledTokens, SchedulerOutput
from albireo.layers.attention import AttentionMetadata
from albireo.model.loader import build_model
from albireo.sampling.sampler import Sampler, SamplingMetadata, SamplingRow
from albireo.sampling_params import SamplingParams


@dataclass
class RunnerRequest:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int

    @classmethod
    def from_new(cls, new: NewRequestData) -> RunnerRequest:
        return cls(
            list(new.prompt_token_ids),
            list(new.output_token_ids),
            new.sampling_params,
            new.eos_token_ids,
            list(new.block_ids),
            new.num_computed_tokens,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.block_size = config.cache.block_size
        self.model = build_model(config.model, config.arch, device, config.max_model_len)
        self.sampler = Sampler()
        self.requests: dict[str, RunnerRequest] = {}
        self.kv_cache: torch.Tensor | None = None

    # ---- KV cache ----------------------------------------------------------------------------------

    def kv_cache_bytes_per_block(self) -> int:
        layer = self.model.attention_layers()[0]
        dtype_size = torch.empty(0, dtype=self.config.model.torch_dtype(self.device)).element_size()
        per_layer = 2 * self.block_size * layer.num_kv_heads * layer.head_dim * dtype_size
        return per_layer * len(self.model.attention_layers())

    def init_kv_cache(self, num_blocks: int) -> None:
        layers = self.model.attention_layers()
        first = layers[0]
        self.kv_cache = torch.zeros(
            len(layers), 2, num_blocks, self.block_size, first.num_kv_heads, first.head_dim,
            dtype=self.config.model.torch_dtype(self.device), device=self.device,
        )
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]

    # ---- one step ---------------------------------------------------------------------------------

    def _apply_plan(self, plan: SchedulerOutput) -> None:
        for req_id in plan.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in plan.new_requests:
            self.requests[new.req_id] = RunnerRequest.from_new(new)
        for cached in plan.cached_requests:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> SampledTokens:
        self._apply_plan(plan)
        if plan.is_empty:
            return SampledTokens([], [])

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        sample_rows: list[int] = []  # index into the batch of each sequence that samples
        sampling_ids: list[str] = []
        bs = self.block_size
        for i, (req_id, n) in enumerate(plan.num_scheduled_tokens.items()):
            state = self.requests[req_id]
            start = state.num_computed_tokens
            end = start + n
            input_ids.extend(state.token_slice(start, end))
            positions.extend(range(start, end))
            slots.extend(state.block_ids[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            block_tables.append(state.block_ids)
            state.num_computed_tokens = end
            if end == state.num_tokens:  # the last known token is in: the next one can be sampled
                sample_rows.append(i)
                sampling_ids.append(req_id)

        device = self.device
        width = max(len(b) for b in block_tables)
        table = torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=table.to(device),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            meta,
        )
        if not sample_rows:
            return SampledTokens([], [])
        last_token_rows = torch.tensor([query_start_loc[i + 1] - 1 for i in sample_rows], device=device)
        logits = self.model.compute_logits(hidden[last_token_rows])
        return self._sample(logits, sampling_ids)

    def _sample(self, logits: torch.Tensor, req_ids: list[str]) -> SampledTokens:
        states = [self.requests[r] for r in req_ids]
        rows = [SamplingRow(s.sampling_params, s.prompt_token_ids, s.output_token_ids, s.eos_token_ids) for s in states]
        metadata = SamplingMetadata.build(rows, logits.shape[-1], logits.device)
        out = self.sampler(logits, metadata)
        token_ids = out.sampled_token_ids.tolist()
        for state, token_id in zip(states, token_ids):
            state.output_token_ids.append(token_id)
        logprobs = None
        if out.logprobs is not None:
            ids, lps, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.sampled_ranks.tolist()
            logprobs = [
                None if s.sampling_params.logprobs is None else (
                    ids[i][: s.sampling_params.logprobs + 1], lps[i][: s.sampling_params.logprobs + 1], ranks[i]
                )
                for i, s in enumerate(states)
            ]
        return SampledTokens(req_ids, token_ids, logprobs)
