"""The frontend side of the engine: text in, text out.

It tokenizes and validates prompts, fans a request with n > 1 out into n engine-core requests,
turns sampled token ids back into text incrementally and applies stop strings. The engine core
below it sees token ids only; it sits behind an EngineCoreClient, in this process (the offline
LLM class) or in a process of its own (the server, through AsyncLLMEngine).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from albireo.config import EngineConfig
from albireo.core.scheduler import EngineCoreOutput
from albireo.engine.client import EngineCoreClient, InprocClient
from albireo.engine.detokenizer import IncrementalDetokenizer
from albireo.engine.request import Request
from albireo.engine.tokenizer import generation_eos_ids, load_tokenizer
from albireo.outputs import CompletionOutput, Logprob, RequestOutput
from albireo.sampling_params import SamplingParams

PromptType = str | list[int]


@dataclass
class _Sample:
    """One of a request's n completions, as the frontend tracks it."""

    core_id: str
    parent: RequestOutput
    output: CompletionOutput
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None


class LLMEngine:
    def __init__(self, config: EngineConfig, client: EngineCoreClient | None = None) -> None:
        """`client` defaults to an engine core in this process."""
        self.config = config
        self.tokenizer = None if config.model.skip_tokenizer_init else load_tokenizer(config.model)
        self.eos_token_ids = sorted(set(config.arch.eos_token_ids) | set(generation_eos_ids(config.model)))
        self.core: EngineCoreClient = client if client is not None else InprocClient(config)
        self.samples: dict[str, _Sample] = {}
        self.requests: dict[str, RequestOutput] = {}
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text, but the tokenizer was skipped: pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check a prompt against the context and the vocabulary; returns the resolved max_tokens."""
        limit, n = self.max_model_len, len(prompt_ids)
        vocab = self.config.arch.vocab_size
        if n == 0:
            raise ValueError("prompt is empty: at least one token is needed")
        try:
            ids = np.asarray(prompt_ids)  # one C pass, not a Python check per token (W1: 1000 x 1024 tokens)
        except (TypeError, ValueError):  # ragged nesting
            ids = None
        if ids is None or ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if n >= limit:
            raise ValueError(
                f"prompt has {n} tokens, but max_model_len is {limit}: the prompt must leave room for one output token"
            )
        if params.max_tokens is None:
            return limit - n
        if n + params.max_tokens > limit:
            raise ValueError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {n} tokens and max_model_len is "
                f"{limit}, so at most {limit - n} tokens can be generated"
            )
        return params.max_tokens

    def check(
        self, prompt: PromptType, params: SamplingParams, add_special_tokens: bool = True
    ) -> tuple[list[int], int]:
        """The prompt's token ids and its resolved max_tokens; raises ValueError naming the field and limit."""
        prompt_ids = self.tokenize(prompt, add_special_tokens)
        return prompt_ids, self.validate(prompt_ids, params)

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams, add_special_tokens: bool = True
    ) -> None:
        """Validate and enqueue; raises ValueError naming the field and limit, changing nothing."""
        self.enqueue(request_id, prompt, *self.check(prompt, params, add_special_tokens), params)

    def enqueue(
        self, request_id: str, prompt: PromptType, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
        final_only: bool = False,
    ) -> None:
        """Enqueue a prompt that `check` accepted, with what it returned (a caller checking a batch of
        prompts before adding any so tokenizes and checks each once). final_only is for callers that
        stream nothing: the request then changes only when it finishes, unless it has stop strings
        or logprobs, which this frontend follows token by token."""
        final_only = final_only and not params.stop and params.logprobs is None
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        parent = RequestOutput(request_id, prompt if isinstance(prompt, str) else None, prompt_ids)
        self.requests[request_id] = parent
        for index in range(params.n):
            child = params if params.n == 1 else replace(
                params, n=1, seed=None if params.seed is None else params.seed + index
            )
            core_id = request_id if params.n == 1 else f"{request_id}#{index}"
            detok = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, prompt_ids, child)
            output = CompletionOutput(index, "", [], logprobs=[] if child.logprobs is not None else None)
            output.cumulative_logprob = 0.0 if child.logprobs is not None else None
            parent.outputs.append(output)
            self.samples[core_id] = _Sample(core_id, parent, output, child, detok)
            self.core.add_request(Request(core_id, prompt_ids, child, self.eos_token_ids, max_tokens, final_only))

    def abort_request(self, request_id: str) -> None:
        parent = self.requests.pop(request_id, None)
        if parent is None:
            return
        ids = [cid for cid, s in self.samples.items() if s.parent is parent]
        self.core.abort_requests(ids)
        for cid in ids:
            del self.samples[cid]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that changed, finished ones for the last time."""
        if not self.requests:
            return []  # a core in another process would have nothing to send: don't wait for it
        return self.process_outputs(self.core.get_outputs() or [])

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        """Fold one batch of engine-core outputs into the requests; returns the requests that changed."""
        changed: dict[str, RequestOutput] = {}
        finishing: list[RequestOutput] = []
        for out in core_outputs:
            sample = self.samples.get(out.req_id)
            if sample is not None:
                if self._apply(sample, out):
                    finishing.append(sample.parent)
                changed[sample.parent.request_id] = sample.parent
        for parent in finishing:  # a parent of n samples finishes with its last one
            if parent.finished:
                self.requests.pop(parent.request_id, None)
        return list(changed.values())

    def _apply(self, sample: _Sample, out: EngineCoreOutput) -> bool:
        """Fold one output into its sample; returns whether the sample finished."""
        output = sample.output
        output.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            for ids, lps, rank in out.new_logprobs:
                entry = {ids[0]: Logprob(lps[0], rank, self._decode_one(ids[0]))}
                for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
                    entry.setdefault(tid, Logprob(lp, r, self._decode_one(tid)))
                output.logprobs.append(entry)
                output.cumulative_logprob += lps[0]
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        detok = sample.detokenizer
        if detok is not None:
            stop_str = detok.update(out.new_token_ids)
            if stop_str is not None:
                if finish_reason is None:
                    self.core.abort_requests([sample.core_id])
                finish_reason, stop_reason = "stop", stop_str
            output.text += detok.take_delta(final=finish_reason is not None)
        if finish_reason is None:
            return False
        output.finish_reason, output.stop_reason = finish_reason, stop_reason
        del self.samples[sample.core_id]
        return True

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def shutdown(self) -> None:
        self.core.shutdown()
