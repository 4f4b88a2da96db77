"""Continuous batching: which requests run in the next step and how many tokens each computes.

One plan per step under a token budget and a cap on running sequences. Running requests go first
(decodes and unfinished prefill chunks), then waiting requests are admitted first come, first
served. When the KV pool runs dry the most recently admitted running request is preempted: its
blocks are released and it is later recomputed from its prompt and the tokens it already produced.
The scheduler deals in token ids and block ids only; it never touches a tensor.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from albireo.config import CacheConfig, SchedulerConfig
from albireo.core.kv_cache_manager import KVCacheManager
from albireo.engine.request import Request, RequestStatus
from albireo.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen, or must rebuild after a preemption."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the workers already hold: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    # Requests the workers should forget: finished, aborted or preempted since the last plan.
    finished_req_ids: set[str] = field(default_factory=set)
    # KV copies between the device pool and the host tier: (host slot, device block) loads, done
    # before this step's attention reads them, and (device block, host slot) saves (those of blocks
    # this plan hands out again before the loads, the rest after).
    kv_loads: list[tuple[int, int]] = field(default_factory=list)
    kv_saves: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        """Nothing to compute (there may still be KV copies to run)."""
        return not self.num_scheduled_tokens


@dataclass
class SampledTokens:
    """What one step produced for the requests that sampled in it."""

    req_ids: list[str]
    token_ids: list[int]
    # Per request: (token ids, logprobs, rank of the sampled token) when logprobs were asked for.
    logprobs: list[tuple[list[int], list[float], int] | None] | None = None
    # Milliseconds of forward, sampling and GPU idle before the step, when steps are profiled.
    device_times: dict[str, float] | None = None


@dataclass
class EngineCoreOutput:
    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[list[int], list[float], int]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int, max_model_len: int,
                 num_host_blocks: int = 0) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching, num_host_blocks)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        # Unfinished requests with penalties, counted so the engine needs no scan per step.
        self.num_penalized = 0

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.num_penalized += request.sampling_params.penalized

    def abort_requests(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.num_penalized -= request.sampling_params.penalized
        self.kv.free(request)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_pending = 0  # a token still in flight for it is dropped when it arrives
        self.waiting.appendleft(request)
        self.finished_req_ids.add(request.request_id)
        self.num_preemptions += 1

    # ---- planning --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []

        # Running requests keep flowing: one token for a decode, the next chunk for a long prompt.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_pending and self._reaches_limit(request):
                i += 1  # its last token is in flight: nothing more to compute
                continue
            n = min(request.num_tokens + request.num_pending - request.num_computed_tokens, budget)
            new_blocks = self.kv.allocate_slots(request, n)
            while new_blocks is None:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    break
                new_blocks = self.kv.allocate_slots(request, n)
            if new_blocks is None:
                break
            num_scheduled[request.request_id] = n
            cached_reqs.append(CachedRequestData(request.request_id, new_blocks, request.num_computed_tokens))
            self._count_planned(request, n)  # later preemptions in this pass take from the end, never it
            budget -= n
            i += 1

        # Waiting requests are admitted in arrival order while blocks, budget and seats last.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.request_id in self.finished_req_ids and request.status == RequestStatus.PREEMPTED:
                # Preempted in this very pass: the pool is short, and a result of an earlier step
                # may still arrive for it, which must find it preempted to be dropped.
                break
            hits, host_hits, num_cached = self.kv.get_computed_blocks(request)
            n = request.num_tokens - num_cached
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if self.kv.allocate_slots(request, n, hits, host_hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_scheduled[request.request_id] = n
            new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=list(request.output_token_ids),
                    sampling_params=request.sampling_params,
                    eos_token_ids=request.eos_token_ids,
                    block_ids=list(self.kv.block_ids(request.request_id)),
                    num_computed_tokens=num_cached,
                )
            )
            self._count_planned(request, n)
            budget -= n

        output = SchedulerOutput(new_reqs, cached_reqs, num_scheduled, self.finished_req_ids,
                                 *self.kv.take_transfers())
        self.finished_req_ids = set()
        return output

    @staticmethod
    def _count_planned(request: Request, n: int) -> None:
        """Count a planned step's tokens as computed at once, so the next plan can be made before
        this one has run."""
        request.num_computed_tokens += n
        if request.num_computed_tokens == request.num_tokens + request.num_pending:
            request.num_pending += 1  # this step samples its next token

    # ---- results ---------------------------------------------------------------------------------

    def update_from_output(self, plan: SchedulerOutput, sampled: SampledTokens) -> list[EngineCoreOutput]:
        outputs = []
        for idx, (req_id, token_id) in enumerate(zip(sampled.req_ids, sampled.token_ids)):
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished, aborted or preempted while the step ran
            request.num_pending -= 1
            request.append_output_token(token_id)
            status = self._check_stop(request, token_id)
            if request.final_only:
                if status is None:
                    continue
                output = EngineCoreOutput(req_id, request.output_token_ids)
            else:
                logprobs = sampled.logprobs[idx] if sampled.logprobs else None
                output = EngineCoreOutput(req_id, [token_id], [logprobs] if logprobs else None)
            if status is not None:
                output.finish_reason = status.finish_reason
                output.stop_reason = request.stop_reason
                self._finish(request, status)
            outputs.append(output)
        return outputs

    def _reaches_limit(self, request: Request) -> bool:
        """Whether the tokens in flight already take the request to max_tokens or the context end."""
        total = request.num_tokens + request.num_pending
        return total - len(request.prompt_token_ids) >= request.max_tokens or total >= self.max_model_len

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if num_out >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
