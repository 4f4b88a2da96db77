"""Offline throughput: N random-token prompts of fixed lengths, all submitted at once, ignore_eos."""

from __future__ import annotations

import argparse
import time

import numpy as np

from albireo.bench.record import MeasuredRegion, engine_facts
from albireo.sampling_params import SamplingParams


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="custom", help="a tag for the record, e.g. W1, W2, W5")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--profile-steps", action="store_true",
                        help="add the per-step breakdown (albireo bench amdahl's) to the record")


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab_size - 100, size=(num, length)).tolist()


def run(args: argparse.Namespace, make_llm) -> dict:
    llm = make_llm()
    engine = llm.engine
    prompts = random_prompts(args.num_prompts, args.input_len, engine.config.arch.vocab_size)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.output_len, ignore_eos=True)
    # Warm-up: compile kernels and touch every code path once, outside the timed region.
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    with MeasuredRegion(llm) as region:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - start

    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    record = {
        **engine_facts(llm, args),
        "num_prompts": args.num_prompts,
        "elapsed_s": elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_out + args.num_prompts * args.input_len) / elapsed,
        "requests_per_s": args.num_prompts / elapsed,
        "num_preemptions": engine.core.scheduler.num_preemptions,
        **region.fields(num_out),
    }
    print(f"{args.workload}: {record['output_tokens_per_s']:.1f} output tokens/s, "
          f"{record['requests_per_s']:.2f} requests/s, {elapsed:.2f} s, allocator retries {region.retries}, cudaMallocs {region.mallocs}")
    return record
