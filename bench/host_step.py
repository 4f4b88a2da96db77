"""Host cost of one engine step at N running requests, with the model and sampler stubbed.

What is left is the serial part of a step that no GPU shrinks: scheduling, staging the inputs,
launching, folding the tokens back into the requests and the frontend's bookkeeping. By default the
steps decode (W5 keeps ~1000 requests running); with long prompts they admit and prefill them (W1:
1024-token prompts, 16 admitted per 16384-token step). Prints ms per step and its phases; --out
writes a record.
    python bench/host_step.py 64 512 1024 [--out benchmarks/results]
    python bench/host_step.py 1024 --prompt-len 1024 --warmup 5 --steps 30
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo import LLM, SamplingParams
from albireo.bench.record import write_record
from albireo.bench.throughput import random_prompts
from albireo.sampling.sampler import SamplerOutput

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
}


MAX_TOKENS = 400


def ms_per_step(n: int, model_dir: str, prompt_len: int, warmup: int, steps: int, final_only: bool = True) -> dict:
    max_len = prompt_len + MAX_TOKENS
    llm = LLM(model_dir, load_format="dummy", device="cpu", skip_tokenizer_init=True, max_num_seqs=n,
              max_num_batched_tokens=16384, num_kv_blocks=n * (-(-max_len // 16)), max_model_len=max_len,
              profile_steps=True)
    runner = llm.engine.core.executor.worker.runner
    hidden, vocab = TINY_LLAMA["hidden_size"], TINY_LLAMA["vocab_size"]
    runner.model.forward = lambda ids, positions, meta: torch.zeros(ids.shape[0], hidden)
    runner.model.compute_logits = lambda h, gather=True: torch.zeros(h.shape[0], vocab)
    runner.sampler = lambda logits, meta: SamplerOutput(torch.full((logits.shape[0],), 7), None, None, None)
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(n, prompt_len, vocab)):
        # As LLM.generate queues them: reported once, when finished.
        llm.engine.enqueue(str(i), prompt, *llm.engine.check(prompt, params), params, final_only=final_only)
    for _ in range(warmup):
        llm.engine.step()
    timeline = llm.engine.core.timeline
    timeline.reset()
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        llm.engine.step()
        walls.append((time.perf_counter() - start) * 1e3)
    phases = timeline.summary().phases_ms
    llm.engine.shutdown()
    # The slowest steps show stalls (W5 on the GPU machine had host phases 5-10x their median for a
    # few steps at a time): are they in this loop, or only where a GPU runs it?
    median = statistics.median(walls)
    return {"ms_per_step": statistics.fmean(walls), "median_ms": median, "max_ms": max(walls),
            "steps_over_2x_median": sum(w > 2 * median for w in walls),
            **{f"{k}_ms": phases[k] for k in ("schedule", "launch", "wait", "update")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sizes", type=int, nargs="*", default=[64, 512, 1024])
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20, help="steps before the timed ones")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model_dir = tempfile.mkdtemp()
    config = dict(TINY_LLAMA, max_position_embeddings=args.prompt_len + MAX_TOKENS)
    Path(model_dir, "config.json").write_text(json.dumps(config))
    results = {}
    for n in args.sizes:
        results[n] = r = ms_per_step(n, model_dir, args.prompt_len, args.warmup, args.steps)
        print(f"{n:5d} running requests: {r['ms_per_step']:.2f} ms per step (schedule {r['schedule_ms']:.2f}, "
              f"launch {r['launch_ms']:.2f}, wait {r['wait_ms']:.2f}, update {r['update_ms']:.2f}); median "
              f"{r['median_ms']:.2f}, max {r['max_ms']:.2f}, {r['steps_over_2x_median']} steps over twice the median")
    if args.out:
        record = {"workload": "host-step", "model": "stub", "prompt_len": args.prompt_len, "by_size": results}
        print(f"record: {write_record(record, args.out)}")


if __name__ == "__main__":
    main()
