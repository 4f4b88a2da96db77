"""Profile engine steps on the GPU: which kernels take the time, and how busy the GPU is.

Runs a throughput-style workload with dummy weights, skips the first steps, profiles the next
ones with torch.profiler and prints the kernel table plus wall time vs GPU-busy time per step;
with --host, profiles the Python side with cProfile instead (torch.profiler inflates host time).
With --tensor-parallel-size t > 1 the kernels run in the worker processes: every rank profiles
itself (albireo/profiling/worker_profile.py), rank 0's table is printed, and with --trace each rank
writes its own trace (rank r > 0 as NAME.rankR.json.gz) (W3 at TP=2:
--num-prompts 1 --input-len 128 --output-len 64 --tensor-parallel-size 2).
"""

import argparse
import cProfile
import os
import pstats
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from albireo import LLM, SamplingParams
from albireo.bench.throughput import random_prompts
from albireo.profiling.worker_profile import ENV, TRACE_ENV


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--skip-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--trace", default=None, help="also write the profiled steps' Chrome trace here")
    p.add_argument("--host", action="store_true", help="cProfile the host side instead")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    args = p.parse_args()

    worker_table = None
    if args.tensor_parallel_size > 1:
        worker_table = os.path.join(tempfile.mkdtemp(), "rank0.txt")
        # +4: the warm-up request's steps come first.
        os.environ[ENV] = f"{args.skip_steps + 4}:{args.steps}:{worker_table}"
        if args.trace:
            os.environ[TRACE_ENV] = args.trace
    llm = LLM(args.model, load_format="dummy", max_model_len=2048, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, skip_tokenizer_init=True,
              tensor_parallel_size=args.tensor_parallel_size)
    engine = llm.engine
    # Four steps (a prefill and three decodes), which the worker's profile skips.
    llm.generate(random_prompts(4, 16, engine.config.arch.vocab_size), SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(args.num_prompts, args.input_len, engine.config.arch.vocab_size)):
        engine.add_request(f"p{i}", prompt, params)
    for _ in range(args.skip_steps):
        engine.step()
    torch.cuda.synchronize()
    if worker_table is not None:
        while engine.has_unfinished_requests():
            engine.step()
        llm.engine.shutdown()
        with open(worker_table) as f:
            text = f.read()
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return
    if args.host:
        host = cProfile.Profile()
        host.enable()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        host.disable()
        stats = pstats.Stats(host)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
        return
    # With a trace, Python frames too: what the host does between the torch calls shows in it.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.trace is not None) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    if args.trace:
        prof.export_chrome_trace(args.trace)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    lines = [
        (f"steps {args.steps}: wall {wall / args.steps * 1e3:.2f} ms/step, GPU busy {gpu_us / args.steps / 1e3:.2f} ms/step "
         f"({gpu_us / 1e6 / wall * 100:.0f}% of wall)"),
        events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60),
        events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    while engine.has_unfinished_requests():
        engine.step()


if __name__ == "__main__":
    main()
