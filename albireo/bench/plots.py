"""Plots of the benchmark records: Albireo against vLLM's numbers on the same kind of GPU.

    python -m albireo.bench.plots [--results benchmarks/results] [--out benchmarks/plots]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# BENCHMARKS.md: vLLM 0.26.0 on an H100 80GB HBM3 (best of its async and sync modes where both ran).
VLLM_H100 = {"W1": 16443, "W2": 8390, "W5": 29114, "W3": 1.673}
H100 = "NVIDIA H100 80GB HBM3"


def latest(records: list[dict], workload: str, async_scheduling: bool) -> dict | None:
    runs = [r for r in records if r.get("workload") == workload and r.get("tp", 1) == 1
            and r.get("device") == H100 and r.get("async_scheduling") == async_scheduling]
    return max(runs, key=lambda r: r["date"], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--out", default="benchmarks/plots")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for path in Path(args.results).glob("W*.json"):
        records.append(json.loads(path.read_text()))
    fig, (tput_ax, lat_ax) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    workloads = ["W1", "W2", "W5"]
    width = 0.27
    for offset, (label, value_of, color) in enumerate((
        ("vLLM 0.26 (best mode)", lambda w: VLLM_H100[w], "#999999"),
        ("Albireo, sync", lambda w: (latest(records, w, False) or {}).get("output_tokens_per_s", 0), "#6baed6"),
        ("Albireo, async", lambda w: (latest(records, w, True) or {}).get("output_tokens_per_s", 0), "#08519c"),
    )):
        values = [value_of(w) for w in workloads]
        xs = [i + (offset - 1) * width for i in range(len(workloads))]
        tput_ax.bar(xs, values, width, label=label, color=color)
        for x, v in zip(xs, values):
            if v:
                tput_ax.text(x, v, f"{v / 1000:.1f}k", ha="center", va="bottom", fontsize=8)
    tput_ax.set_xticks(range(len(workloads)), ["W1 1B\n1024 in/128 out", "W2 8B\n512 in/256 out", "W5 1B\n128 in/512 out"])
    tput_ax.set_ylabel("output tokens/s (higher is better)")
    tput_ax.legend(fontsize=8)
    tput_ax.set_title("Offline throughput, 1000 prompts, TP=1")
    lat = [("vLLM", VLLM_H100["W3"], "#999999")]
    for label, mode in (("sync", False), ("async", True)):
        record = latest(records, "W3", mode)
        if record:
            lat.append((label, record["seconds_per_request"], "#6baed6" if not mode else "#08519c"))
    lat_ax.bar([n for n, _, _ in lat], [v for _, v, _ in lat], color=[c for _, _, c in lat])
    lat_ax.axhline(1.37, color="red", ls="--", lw=1, label="physical floor 1.37 s")
    for i, (_, v, _) in enumerate(lat):
        lat_ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    lat_ax.set_ylabel("seconds per request (lower is better)")
    lat_ax.set_title("W3 8B, batch 1, 128/256")
    lat_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{H100}, dummy weights, bf16")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "h100_vs_vllm.png", dpi=120)
    print(out / "h100_vs_vllm.png")


if __name__ == "__main__":
    main()
