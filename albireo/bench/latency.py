"""End-to-end latency of a batch (default: one request), and milliseconds per output token."""

from __future__ import annotations

import argparse
import statistics
import time

from albireo.bench.record import MeasuredRegion, engine_facts
from albireo.bench.throughput import random_prompts
from albireo.sampling_params import SamplingParams


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="W3")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup-iters", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--profile-steps", action="store_true",
                        help="add the per-step breakdown (albireo bench amdahl's) to the record")


def run(args: argparse.Namespace, make_llm) -> dict:
    llm = make_llm()
    engine = llm.engine
    prompts = random_prompts(args.batch_size, args.input_len, engine.config.arch.vocab_size)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.warmup_iters):
        llm.generate(prompts, params, use_tqdm=False)
    times = []
    with MeasuredRegion(llm) as region:
        for _ in range(args.iters):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    record = {
        **engine_facts(llm, args),
        "batch_size": args.batch_size,
        "iters": args.iters,
        "seconds_per_request": median,
        "seconds_per_request_all": times,
        "ms_per_output_token": median / args.output_len * 1000,
        **region.fields(args.iters * args.batch_size * args.output_len),
    }
    print(f"{args.workload}: {median:.3f} s per request (median of {args.iters}), "
          f"{record['ms_per_output_token']:.2f} ms per output token")
    return record
