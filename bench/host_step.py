"""Host cost of one engine step at N running decode requests, with the model and sampler stubbed.

What is left is the serial part of a decode step that no GPU shrinks: scheduling, staging the
inputs, launching, folding the tokens back into the requests and the frontend's bookkeeping.
(W5 keeps ~1000 requests running.) Prints ms per step and its phases; --out writes a record.
    python bench/host_step.py 64 512 1024 [--out benchmarks/results]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo import LLM, SamplingParams  # noqa: E402
from albireo.bench.record import write_record  # noqa: E402
from albireo.bench.throughput import random_prompts  # noqa: E402
from albireo.sampling.sampler import SamplerOutput  # noqa: E402

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
}


def ms_per_step(n: int, model_dir: str, steps: int = 100) -> dict:
    llm = LLM(model_dir, load_format="dummy", device="cpu", skip_tokenizer_init=True, max_num_seqs=n,
              max_num_batched_tokens=16384, num_kv_blocks=n * 20, max_model_len=512, profile_steps=True)
    runner = llm.engine.core.executor.worker.runner
    hidden, vocab = TINY_LLAMA["hidden_size"], TINY_LLAMA["vocab_size"]
    runner.model.forward = lambda ids, positions, meta: torch.zeros(ids.shape[0], hidden)
    runner.model.compute_logits = lambda h, gather=True: torch.zeros(h.shape[0], vocab)
    runner.sampler = lambda logits, meta: SamplerOutput(torch.full((logits.shape[0],), 7), None, None, None)
    params = SamplingParams(temperature=1.0, max_tokens=400, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(n, 8, vocab)):
        llm.engine.add_request(str(i), prompt, params)
    for _ in range(20):
        llm.engine.step()
    timeline = llm.engine.core.timeline
    timeline.reset()
    start = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    wall = (time.perf_counter() - start) / steps * 1e3
    phases = timeline.summary().phases_ms
    llm.engine.shutdown()
    return {"ms_per_step": wall, **{f"{k}_ms": phases[k] for k in ("schedule", "launch", "wait", "update")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sizes", type=int, nargs="*", default=[64, 512, 1024])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model_dir = tempfile.mkdtemp()
    Path(model_dir, "config.json").write_text(json.dumps(TINY_LLAMA))
    results = {}
    for n in args.sizes:
        results[n] = r = ms_per_step(n, model_dir)
        print(f"{n:5d} running requests: {r['ms_per_step']:.2f} ms per step (schedule {r['schedule_ms']:.2f}, "
              f"launch {r['launch_ms']:.2f}, wait {r['wait_ms']:.2f}, update {r['update_ms']:.2f})")
    if args.out:
        print(f"record: {write_record({'workload': 'host-step', 'model': 'stub', 'by_size': results}, args.out)}")


if __name__ == "__main__":
    main()
