"""Where a step's GPU time goes when kernels overlap: a Chrome trace's kernels on the busiest stream,
each charged with the time from the end of the kernel before it to its own end.

Under programmatic dependent launch a kernel starts while the one before it still runs and waits
inside for it, so the profiler's kernel durations add up to more than the step. The kernel ends,
in stream order, do not overlap: the time between two ends is what the later kernel added to the
chain, and a gap before a kernel's start (the GPU idle) is charged to "(idle)".

With --spread NAME it also prints what each launch of the kernels whose name holds NAME was charged,
by the launch's place in the step: an all-reduce charged more than it takes alone was waiting for
a peer, and where in the step that happens tells launch lateness (the first of a step) from a
slower GPU (every one). Given the other ranks' traces (profile_steps.py writes `NAME.rankR.json.gz`
beside rank 0's), each rank's table and spread are printed.

    python bench/critical_path.py TRACE [OTHER_RANK_TRACE ...] [--steps N] [--top K] [--spread NAME]
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


def charges(kernels: list[dict]) -> list[tuple[float, float]]:
    """Each kernel's (charge, idle time before it) in us, in stream order."""
    out = []
    prev_end = kernels[0]["ts"]
    for k in kernels:
        end = k["ts"] + k["dur"]
        idle = max(k["ts"] - prev_end, 0.0)
        prev_end = max(prev_end, k["ts"])
        out.append((max(end - prev_end, 0.0), idle))
        prev_end = max(prev_end, end)
    return out


def critical_path(kernels: list[dict]) -> tuple[dict[str, float], dict[str, int], float]:
    """(charged us by kernel name, launches by name, span us) of the stream's kernels."""
    charged: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    for k, (us, idle) in zip(kernels, charges(kernels), strict=True):
        charged["(idle)"] += idle
        charged[short(k["name"])] += us
        count[short(k["name"])] += 1
    end = max(k["ts"] + k["dur"] for k in kernels)
    return charged, count, end - kernels[0]["ts"]


def spread(kernels: list[dict], name: str, steps: int) -> str:
    """Percentiles of the named kernels' charges, and their mean charge by place in the step."""
    picked = [us for k, (us, _) in zip(kernels, charges(kernels), strict=True) if name in k["name"]]
    if not picked or len(picked) % steps:
        return f"{len(picked)} launches of {name!r}: not a whole number per step"
    per_step = len(picked) // steps
    ranked = sorted(picked)
    pct = {q: ranked[min(len(ranked) - 1, int(q / 100 * len(ranked)))] for q in (10, 50, 90, 99)}
    lines = [(f"{name}: {per_step} a step, charged us p10 {pct[10]:.1f} p50 {pct[50]:.1f} p90 {pct[90]:.1f} "
              f"p99 {pct[99]:.1f} max {ranked[-1]:.1f} mean {sum(picked) / len(picked):.1f}")]
    by_place = [sum(picked[s * per_step + i] for s in range(steps)) / steps for i in range(per_step)]
    lines.append("by place in the step: " + " ".join(f"{us:.1f}" for us in by_place))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("others", nargs="*", help="other ranks' traces of the same steps, each shown the same way")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (to print per-step times)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--spread", default=None, help="a kernel name (or part of one) to show launch by launch")
    args = p.parse_args()
    for path in [args.trace, *args.others]:
        kernels = load_kernels(path)
        charged, count, span = critical_path(kernels)
        print(f"{path}: span {span / args.steps:.1f} us/step on the busiest stream")
        print(f"{'kernel':60} {'us/step':>9} {'launches/step':>14} {'us/launch':>10}")
        for name, us in sorted(charged.items(), key=lambda kv: -kv[1])[: args.top]:
            n = count.get(name, 0) / args.steps
            print(f"{name:60} {us / args.steps:9.1f} {n:14.1f} {us / args.steps / n if n else 0:10.2f}")
        if args.spread:
            print(spread(kernels, args.spread, args.steps))


if __name__ == "__main__":
    main()
