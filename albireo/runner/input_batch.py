"""The runner's persistent copy of the running requests, laid out for vectorized input building.

Each request owns a row of two host arrays: its token ids and its block table. A step's flat
inputs (token ids, positions, cache slots) are then a few numpy gathers over those rows instead
of a Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from albireo.core.scheduler import NewRequestData
from albireo.sampling_params import SamplingParams


@dataclass
class RunnerRequest:
    row: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    num_computed_tokens: int
    num_blocks: int
    # Tokens sampled by launched steps that have not reached the host yet.
    num_pending: int = 0

    def __post_init__(self) -> None:
        # Read for every request every step: kept, not recounted.
        self.num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.block_table = np.zeros((max_num_reqs, self.max_blocks), dtype=np.int32)
        self.free_rows = list(range(max_num_reqs - 1, -1, -1))
        self.requests: dict[str, RunnerRequest] = {}

    def add(self, new: NewRequestData) -> None:
        row = self.free_rows.pop()
        prompt, output = list(new.prompt_token_ids), list(new.output_token_ids)
        n = len(prompt) + len(output)
        self.token_ids[row, : len(prompt)] = prompt
        self.token_ids[row, len(prompt) : n] = output
        self.block_table[row, : len(new.block_ids)] = new.block_ids
        self.requests[new.req_id] = RunnerRequest(
            row, prompt, output, new.sampling_params, new.eos_token_ids, new.num_computed_tokens, len(new.block_ids)
        )

    def remove(self, req_id: str) -> None:
        request = self.requests.pop(req_id, None)
        if request is not None:
            self.free_rows.append(request.row)

    def add_blocks(self, req_id: str, block_ids: list[int]) -> None:
        request = self.requests[req_id]
        self.block_table[request.row, request.num_blocks : request.num_blocks + len(block_ids)] = block_ids
        request.num_blocks += len(block_ids)

    def append_token(self, request: RunnerRequest, token_id: int) -> None:
        self.token_ids[request.row, request.num_tokens] = token_id
        request.output_token_ids.append(token_id)
        request.num_tokens += 1

    def gather(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
        """Flat (token ids, positions, cache slots) for `counts[i]` tokens of `rows[i]` from `starts[i]`."""
        ends = np.cumsum(counts)
        token_rows = np.repeat(rows, counts)
        positions = np.repeat(starts - (ends - counts), counts) + np.arange(ends[-1])
        token_ids = self.token_ids[token_rows, positions]
        bs = self.block_size
        slots = self.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        return token_ids, positions, slots
