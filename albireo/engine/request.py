"""A request as the engine core sees it: token ids, progress and status; no text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from albireo.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass(eq=False)  # a request is itself, not its fields: `in` and list.remove compare identities
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    max_tokens: int  # resolved against the context length
    # Report the request once, when it finishes, with all its output tokens (LLM.generate, which
    # streams nothing): no output per token to build on the engine's side and fold on the frontend's.
    final_only: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose KV is in the cache, or will be once the step that scheduled them has run.
    num_computed_tokens: int = 0
    # Tokens being sampled by steps already planned whose results have not come back (async
    # scheduling plans a step before the previous one's token is known).
    num_pending: int = 0
    # Prefix-cache hashes of this request's full blocks, in order; filled by the KV cache manager.
    block_hashes: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        # Read several times per request per step by the scheduler: kept, not recounted.
        self.num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    def token_ids(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens start..end-1 of the prompt followed by the output."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return tuple(self.prompt_token_ids[start:end])
        if start >= n:
            return tuple(self.output_token_ids[start - n : end - n])
        return tuple(self.prompt_token_ids[start:]) + tuple(self.output_token_ids[: end - n])
