"""Host-side profile (cProfile) of engine steps: where the Python time of a step goes."""

import argparse
import cProfile
import pstats

import torch

from albireo import LLM, SamplingParams
from albireo.bench.throughput import random_prompts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--skip-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=2048, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, skip_tokenizer_init=True)
    engine = llm.engine
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(args.num_prompts, args.input_len, engine.config.arch.vocab_size)):
        engine.add_request(f"p{i}", prompt, params)
    for _ in range(args.skip_steps):
        engine.step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
