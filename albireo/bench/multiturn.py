"""Multi-turn chat over a device KV pool too small for the working set: host tier vs recompute.

Conversations share one long system prompt; each turn appends a user message and the reply. They
take turns one request at a time (round robin), so by the time a conversation speaks again the
others have pushed its history out of the device pool: without the host tier it is recomputed,
with it it is loaded back layer by layer. Reports TTFT and throughput for both, the tier's hits,
bytes moved and the time the forward waited on loads, and plots one load step's timeline.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from tqdm import tqdm

from albireo.bench.serve import latency_summary
from albireo.bench.throughput import random_prompts
from albireo.sampling_params import SamplingParams


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="multiturn")
    # Defaults where the history dominates a turn's prompt, so recompute has something to cost:
    # by turn 6 a request brings 1024 new tokens on top of ~5,300 of history.
    parser.add_argument("--num-conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--user-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--out-dir", default="benchmarks/results")


def _one_mode(args: argparse.Namespace, make_llm) -> tuple[dict, dict]:
    llm = make_llm()
    engine = llm.engine
    vocab = engine.config.arch.vocab_size
    system = random_prompts(1, args.system_len, vocab, seed=1)[0]
    users = random_prompts(args.num_conversations * args.turns, args.user_len, vocab, seed=2)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([system[:64]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    worker = getattr(engine.core.executor, "worker", None)  # in this process at TP=1 only
    runner = worker.runner if worker is not None else None
    offload = runner.offload if runner is not None else None
    chats = [list(system) for _ in range(args.num_conversations)]
    ttft: dict[int, list[float]] = {t: [] for t in range(args.turns)}
    num_out = 0
    start = time.perf_counter()
    with tqdm(total=args.num_conversations * args.turns, desc=f"kv_offload_gb={args.kv_offload_gb}") as bar:
        for turn in range(args.turns):
            if offload is not None and turn == args.turns - 1:
                offload.trace_next = True
            for c, chat in enumerate(chats):
                chat += users[turn * args.num_conversations + c]
                req_id = engine.new_request_id()
                sent = time.perf_counter()
                engine.add_request(req_id, list(chat), params)
                first = None
                tokens: list[int] = []
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if first is None and out.outputs[0].token_ids:
                            first = time.perf_counter()
                        tokens = out.outputs[0].token_ids
                ttft[turn].append(first - sent)
                chat += tokens
                num_out += len(tokens)
                bar.update()
    elapsed = time.perf_counter() - start
    kv = engine.core.scheduler.kv
    overall = latency_summary([v for vs in ttft.values() for v in vs])
    result = {
        "ttft_ms_p50": overall["p50"],
        "ttft_ms_p90": overall["p90"],
        "ttft_ms_p50_after_first_turn": latency_summary([v for t in range(1, args.turns) for v in ttft[t]])["p50"],
        "ttft_ms_p50_by_turn": [latency_summary(ttft[t])["p50"] for t in range(args.turns)],
        "output_tokens_per_s": num_out / elapsed,
        "elapsed_s": elapsed,
        "device_hit_tokens": kv.num_prefix_hits,
        "host_hit_tokens": kv.num_host_hits,
        "num_kv_blocks": kv.num_blocks,
        "num_host_blocks": kv.host.num_slots if kv.host is not None else 0,
    }
    trace = {}
    if offload is not None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        runner.account_loads()
        s = offload.stats
        result.update({
            "blocks_loaded": s.blocks_loaded, "blocks_saved": s.blocks_saved,
            "bytes_loaded": s.bytes_loaded, "bytes_saved": s.bytes_saved, "load_steps": s.load_steps,
            "load_wait_ms": s.load_wait_ms, "load_forward_ms": s.load_forward_ms,
            "load_wait_fraction": s.load_wait_ms / s.load_forward_ms if s.load_forward_ms else None,
        })
        trace = s.trace
    engine.shutdown()
    del llm, engine, worker, runner, offload
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, trace


def plot_trace(trace: dict, path: Path) -> None:
    """One load step: each layer's copy on the copy stream against the forward and its waits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 2.6))
    (f0, f1), = trace["forward"]
    ax.broken_barh([(f0, f1 - f0)], (0.6, 0.8), color="#9ecae1", label="forward (compute stream)")
    ax.broken_barh([(a, b - a) for a, b in trace["wait"]], (0.6, 0.8), color="#d62728", label="waiting on a layer's load")
    for i, (a, b) in enumerate(trace["copy"]):
        ax.broken_barh([(a, b - a)], (1.6, 0.8), color="#08519c" if i % 2 else "#6baed6")
    ax.plot([], [], color="#08519c", lw=6, label="layer i's blocks host -> device (copy stream)")
    ax.set_yticks([1.0, 2.0], ["compute", "copy"])
    ax.set_xlabel("ms since the step's first copy")
    ax.legend(fontsize=8, loc="upper right", ncol=3)
    ax.set_ylim(0.4, 3.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, make_llm) -> dict:
    tier_gb = args.kv_offload_gb
    if not tier_gb:
        raise ValueError("kv_offload_gb must be > 0 for this benchmark (it compares the host tier with recompute)")
    record = {"workload": args.workload, "model": args.model_name, "tp": args.tensor_parallel_size,
              "num_conversations": args.num_conversations, "turns": args.turns, "system_len": args.system_len,
              "user_len": args.user_len, "output_len": args.output_len, "kv_offload_gb": tier_gb, "modes": {}}
    for mode, gb in (("recompute", 0.0), ("host_tier", tier_gb)):
        args.kv_offload_gb = gb
        result, trace = _one_mode(args, make_llm)
        record["modes"][mode] = result
        print(f"{mode}: TTFT p50 {result['ttft_ms_p50']:.1f} ms (after turn 1: "
              f"{result['ttft_ms_p50_after_first_turn'] or 0:.1f}), {result['output_tokens_per_s']:.0f} output tok/s, "
              f"host hits {result['host_hit_tokens']} tokens, device hits {result['device_hit_tokens']}")
        if trace:
            png = Path(args.out_dir) / f"kv-offload-timeline-{args.model_name}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            plot_trace(trace, png)
            record["timeline_plot"] = str(png)
    args.kv_offload_gb = tier_gb
    tier, recompute = record["modes"]["host_tier"], record["modes"]["recompute"]
    record["ttft_p50_ratio"] = tier["ttft_ms_p50"] / recompute["ttft_ms_p50"]
    print(f"TTFT p50 with the tier / recompute: {record['ttft_p50_ratio']:.2f}; forward waited on loads "
          f"{(tier.get('load_wait_fraction') or 0):.1%} of load steps' forward time")
    return record
