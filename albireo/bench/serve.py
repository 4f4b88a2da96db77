"""Online serving benchmark against any OpenAI-compatible server (`albireo bench serve`).

Requests arrive as a Poisson process at --request-rate (or all at once with inf), optionally
capped at --max-concurrency in flight. Each is a streamed /v1/completions call with a random
token-id prompt of --input-len tokens and exactly --output-len output tokens (ignore_eos), so
runs are comparable across servers. Reports throughput, TTFT / TPOT / ITL / end-to-end latency
(mean, p50, p90, p99, in ms) and goodput: requests per second that met the TTFT and TPOT SLOs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    parser.add_argument("--model", default=None, help="the served model's name (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompt-vocab", type=int, default=500,
                        help="prompt token ids are drawn from [3, this): below any real vocabulary's size")
    parser.add_argument("--dataset", default=None,
                        help="ShareGPT-format JSON (a list of {'conversations': [{'from', 'value'}, ...]}): each "
                             "conversation's first human turn becomes a text prompt; --input-len is then unused")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="mean requests per second of the Poisson arrivals (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workload", default="serve")
    parser.add_argument("--model-name", default=None, help="the model's name in the record (default: --model)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--no-plot", dest="plot", action="store_false")


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0
    ttft: float = 0.0  # seconds to the first token
    e2e: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)  # gaps between streamed chunks
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one(client, url: str, body: dict, headers: dict) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start)
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = last is not None
    except Exception as e:  # a failed request is counted, not fatal to the run
        result.error = f"{type(e).__name__}: {e}"
    return result


def sharegpt_prompts(path: str, num: int, rng: random.Random) -> list[str]:
    """The first human turn of `num` conversations drawn from a ShareGPT-format JSON file."""
    data = json.loads(Path(path).read_text())
    turns = [
        conv["conversations"][0]["value"]
        for conv in data
        if conv.get("conversations") and conv["conversations"][0].get("from") == "human"
        and conv["conversations"][0].get("value")
    ]
    if not turns:
        raise ValueError(f"{path} holds no ShareGPT conversation that starts with a human turn")
    return [rng.choice(turns) for _ in range(num)]


def latency_summary(seconds: list[float]) -> dict:
    """mean, p50, p90, p99 in milliseconds (nearest-rank percentiles); None for no values."""
    if not seconds:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(seconds)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] * 1000

    return {"mean": statistics.fmean(s) * 1000, "p50": pct(50), "p90": pct(90), "p99": pct(99)}


async def _run(args: argparse.Namespace) -> tuple[list[RequestResult], float, str]:
    import httpx

    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        model = args.model
        if model is None:
            model = (await client.get(f"{base}/v1/models", headers=headers)).json()["data"][0]["id"]
        if args.dataset:
            prompts = sharegpt_prompts(args.dataset, args.num_prompts, rng)
        else:
            prompts = [[rng.randrange(3, args.prompt_vocab) for _ in range(args.input_len)]
                       for _ in range(args.num_prompts)]
        limit = asyncio.Semaphore(args.max_concurrency or args.num_prompts)

        async def limited(prompt: list[int] | str) -> RequestResult:
            body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            async with limit:
                return await _one(client, f"{base}/v1/completions", body, headers)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start, model


def run(args: argparse.Namespace) -> tuple[dict, list[RequestResult]]:
    results, duration, model = asyncio.run(_run(args))
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    good = [r for r in ok if r.ttft * 1000 <= args.slo_ttft_ms and (r.tpot or 0) * 1000 <= args.slo_tpot_ms]
    record = {
        "workload": args.workload,
        "model": args.model_name or model,
        "base_url": args.base_url,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "max_concurrency": args.max_concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        # The server's count: with --dataset the prompts are text of their own lengths.
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "goodput_requests_per_s": len(good) / duration,
        "ttft_ms": latency_summary([r.ttft for r in ok]),
        "tpot_ms": latency_summary([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": latency_summary([g for r in ok for g in r.itls]),
        "e2e_ms": latency_summary([r.e2e for r in ok]),
    }
    return record, results


def plot(results: list[RequestResult], path: Path) -> Path:
    """CDFs of TTFT, TPOT, ITL and end-to-end latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    series = {
        "TTFT": [r.ttft for r in ok],
        "TPOT": [r.tpot for r in ok if r.tpot is not None],
        "ITL": [g for r in ok for g in r.itls],
        "end-to-end": [r.e2e for r in ok],
    }
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, (name, values) in zip(axes, series.items()):
        values = sorted(v * 1000 for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> None:
    from albireo.bench.record import write_record

    record, results = run(args)
    path = write_record(record, args.out_dir)
    print(f"completed {record['completed']}/{args.num_prompts} in {record['duration_s']:.2f} s: "
          f"{record['requests_per_s']:.2f} req/s, {record['output_tokens_per_s']:.1f} output tok/s, "
          f"goodput {record['goodput_requests_per_s']:.2f} req/s")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = record[name]
        if s["mean"] is not None:
            print(f"  {name:8s} mean {s['mean']:8.1f}  p50 {s['p50']:8.1f}  p90 {s['p90']:8.1f}  p99 {s['p99']:8.1f}")
    print(f"record: {path}")
    if args.plot:
        print(f"plot: {plot(results, path.with_suffix('.png'))}")
