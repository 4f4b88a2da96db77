"""Where a step's GPU time goes when kernels overlap: a Chrome trace's kernels on the busiest stream,
each charged with the time from the end of the kernel before it to its own end.

Under programmatic dependent launch a kernel starts while the one before it still runs and waits
inside for it, so the profiler's kernel durations add up to more than the step. The kernel ends,
in stream order, do not overlap: the time between two ends is what the later kernel added to the
chain, and a gap before a kernel's start (the GPU idle) is charged to "(idle)".

    python bench/critical_path.py TRACE [--steps N] [--top K]
"""

import argparse
import collections
import gzip
import json


def load_kernels(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        raise SystemExit(f"{path}: no GPU kernels in the trace (was it recorded with CUDA activity?)")
    by_stream = collections.Counter(e["args"].get("stream") for e in kernels)
    busiest = by_stream.most_common(1)[0][0]
    return sorted((e for e in kernels if e["args"].get("stream") == busiest), key=lambda e: e["ts"])


def short(name: str) -> str:
    name = name.split("(")[0].split("<")[0]
    return name[:60]


def critical_path(kernels: list[dict]) -> tuple[dict[str, float], dict[str, int], float]:
    """(charged us by kernel name, launches by name, span us) of the stream's kernels."""
    charged: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    prev_end = kernels[0]["ts"]
    for k in kernels:
        end = k["ts"] + k["dur"]
        if k["ts"] > prev_end:
            charged["(idle)"] += k["ts"] - prev_end
            prev_end = k["ts"]
        charged[short(k["name"])] += max(end - prev_end, 0.0)
        count[short(k["name"])] += 1
        prev_end = max(prev_end, end)
    return charged, count, prev_end - kernels[0]["ts"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (to print per-step times)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    charged, count, span = critical_path(load_kernels(args.trace))
    print(f"{args.trace}: span {span / args.steps:.1f} us/step on the busiest stream")
    print(f"{'kernel':60} {'us/step':>9} {'launches/step':>14} {'us/launch':>10}")
    for name, us in sorted(charged.items(), key=lambda kv: -kv[1])[: args.top]:
        n = count.get(name, 0) / args.steps
        print(f"{name:60} {us / args.steps:9.1f} {n:14.1f} {us / args.steps / n if n else 0:10.2f}")


if __name__ == "__main__":
    main()
