"""The offline API: `LLM(model).generate(prompts, params)` and `LLM(model).chat(messages)`."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from albireo.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from albireo.engine.llm_engine import LLMEngine, PromptType
from albireo.outputs import RequestOutput
from albireo.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """An engine in this process. `model` is an HF directory, a .gguf file, or None for the default model."""

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        load_format: str = "auto",
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.9,
        cpu_kv_cache_gb: float = 1.0,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_chunked_prefill: bool = True,
        async_scheduling: bool = True,
        tensor_parallel_size: int = 1,
        tp_sampling: str = "seq_parallel",
        skip_tokenizer_init: bool = False,
        enforce_eager: bool = False,
        fused_kernels: bool = True,
        profile_steps: bool = False,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(model, tokenizer, load_format, dtype, max_model_len, seed, skip_tokenizer_init),
            cache=CacheConfig(block_size, enable_prefix_caching, gpu_memory_utilization, cpu_kv_cache_gb, num_kv_blocks),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, async_scheduling),
            parallel=ParallelConfig(tensor_parallel_size, tp_sampling),
            device=device,
            enforce_eager=enforce_eager,
            fused_kernels=fused_kernels,
            profile_steps=profile_steps,
        )
        self.engine = LLMEngine(config)

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

        Every prompt is validated before any runs: a bad one raises ValueError naming its index.
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
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                engine.validate(engine.tokenize(prompt, add_special_tokens), p)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        ids = []
        for prompt, p in zip(prompts, params):
            ids.append(engine.new_request_id())
            engine.add_request(ids[-1], prompt, p, add_special_tokens)
        return self._run(ids, use_tqdm)

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

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while pending:
                for out in self.engine.step():
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
