"""The offline API: `LLM(model).generate(prompts, params)` and `LLM(model).chat(messages)`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tqdm import tqdm

from albireo.config import engine_config
from albireo.engine.llm_engine import LLMEngine, PromptType
from albireo.outputs import RequestOutput
from albireo.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """An engine in this process. `model` is an HF directory, a .gguf file, or None for the default model."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        """`engine_args` are albireo.config.engine_config's keyword arguments (dtype, max_model_len,
        tensor_parallel_size, ...)."""
        self.engine = LLMEngine(engine_config(model, **engine_args))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_special_tokens: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); outputs come back in the order of the prompts.

        A bad prompt raises ValueError naming its index, and no request of the call is left running.
        The prompts are checked and queued as the GPU goes, two steps' worth before each step: with
        1000 prompts of 1024 tokens, checking and queueing them all first kept the GPU idle 0.1 s.
        A step takes at most one step's worth (max_num_batched_tokens, max_num_seqs), so the scheduler
        always finds at least that many waiting and plans the steps it would with all of them queued.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling_params")
        engine = self.engine
        request_ids = [engine.new_request_id() for _ in prompts]
        queue = iter(enumerate(zip(request_ids, prompts, params)))
        step_tokens, step_prompts = engine.config.scheduler.max_num_batched_tokens, engine.config.scheduler.max_num_seqs

        def enqueue() -> None:
            """Check and queue the next prompts: twice what one step can take of them."""
            tokens = 0
            for count, (i, (request_id, prompt, p)) in enumerate(queue, 1):
                try:
                    prompt_ids, max_tokens = engine.check(prompt, p, add_special_tokens)
                except ValueError as e:
                    raise ValueError(f"prompts[{i}]: {e}") from None
                engine.enqueue(request_id, prompt, prompt_ids, max_tokens, p, final_only=True)  # nothing streams
                tokens += len(prompt_ids)
                if tokens >= 2 * step_tokens or count >= 2 * step_prompts:
                    return

        return self._run(request_ids, enqueue, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation or several, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template) for c in conversations]
        # The template already spells out BOS and the other special tokens.
        return self.generate(prompts, sampling_params, use_tqdm, add_special_tokens=False)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> str:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer, but the tokenizer was skipped")
        if chat_template is None and not tokenizer.chat_template:
            raise ValueError("the model has no chat template: pass chat_template")
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
        )

    def _run(self, request_ids: list[str], enqueue: Callable[[], None], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request is done; before each step enqueue() queues more of the call's
        prompts, while the GPU runs the step before (under async scheduling engine.step returns as
        soon as it has launched a step)."""
        results: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while pending:
                enqueue()
                outputs = self.engine.step()
                for out in outputs:
                    if out.finished and out.request_id in pending:
                        results[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        except BaseException:
            for request_id in pending:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[r] for r in request_ids]
