"""Plots of the benchmark records: Albireo against vLLM's numbers on the same kind of GPU, and
tensor-parallel scaling (throughput and latency against the TP degree, with the ideal line).

    python -m albireo.bench.plots [--results benchmarks/results] [--out benchmarks/plots]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# BENCHMARKS.md: vLLM 0.26.0 on an H100 80GB HBM3 (best of its async and sync modes where both ran).
VLLM_H100 = {"W1": 16443, "W2": 8390, "W5": 29114, "W3": 1.673}
MODEL = {"W1": "llama-3.2-1b", "W2": "llama-3.1-8b", "W5": "llama-3.2-1b", "W3": "llama-3.1-8b"}
H100 = "NVIDIA H100 80GB HBM3"


def per_mode(record: dict) -> list[dict]:
    """An `albireo bench amdahl` record (both modes in one file) as one record per mode."""
    if "modes" not in record:
        return [record]
    base = {k: v for k, v in record.items() if k != "modes"}
    return [{**base, **run, "async_scheduling": mode == "async"} for mode, run in record["modes"].items()]


def latest(records: list[dict], workload: str, async_scheduling: bool) -> dict | None:
    """The newest TP=1 H100 run of a workload on its own model in one mode (A/B runs with PDL, copy
    streams or the matmul's residual add off, or under a changed environment, runs of one TP rank's
    share of the model, and runs over a float8 KV cache, do not count)."""
    runs = [r for r in records if r.get("workload") == workload and r.get("model") == MODEL[workload]
            and r.get("tp", 1) == 1 and r.get("pdl", True) and r.get("kv_cache_dtype", "auto") == "auto"
            and r.get("copy_streams", True) and r.get("gemm_residual", True) and "environment" not in r
            and r.get("device") == H100 and r.get("async_scheduling") == async_scheduling]
    return max(runs, key=lambda r: r["date"], default=None)


def plot_vs_vllm(records: list[dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

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
                tput_ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
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
    fig.savefig(out / "h100_vs_vllm.png", dpi=120)
    plt.close(fig)
    return out / "h100_vs_vllm.png"


def scaling_runs(
    records: list[dict], device: str, workload: str, model: str, async_scheduling: bool, commits: set[str]
) -> dict[int, dict]:
    """The latest profiled run at each TP degree among the given commits (one machine's set of runs;
    the all-reduce over peer memory, where it was on)."""
    runs: dict[int, dict] = {}
    for r in records:
        if (r.get("device") == device and r.get("workload") == workload and r.get("model") == model
                and r.get("commit") in commits
                and r.get("async_scheduling") == async_scheduling and "step_breakdown" in r
                and r.get("all_reduce", "symm_mem") == "symm_mem"
                and (r["tp"] not in runs or r["date"] > runs[r["tp"]]["date"])):
            runs[r["tp"]] = r
    return runs


# The two fits of `albireo.bench.amdahl.fit_measured`: TP=8 was not measured, and the two bracket it.
_FIT_LABELS = {False: "cost a / t + b", True: "cost a / t + b + c (t - 1)"}


def plot_tp_scaling(
    records: list[dict], device: str, commits: set[str], out: Path, newer: set[str] = frozenset()
) -> tuple[Path, dict]:
    """The plot, and per async series both fits of `fit_measured` with their TP=8 predictions. The
    runs of `newer` commits (another machine's, of later code: W2 async alone, say) are drawn
    beside those of `commits`, in a colour of their own."""
    import matplotlib.pyplot as plt

    from albireo.bench.amdahl import fit_measured

    fits: dict[str, dict] = {}
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.5))
    later = ", ".join(sorted(newer))
    for ax, model in zip(axes[:2], ("llama-3.1-8b", "qwen2.5-32b")):
        base = None
        # Annotations: async on above its points, off below (at TP=1 and TP=2 the two nearly
        # meet), the newer runs above and to the left, with their speedup over their own TP=1.
        for mode, run_commits, color, label, offset in ((True, commits, "#08519c", "async on", (4, 6)),
                                                        (False, commits, "#6baed6", "async off", (4, -12)),
                                                        (True, newer, "#e6550d", f"async on, {later}", (-60, 8))):
            runs = scaling_runs(records, device, "W2", model, mode, run_commits)
            if not runs:
                continue
            tps = sorted(runs)
            values = [runs[t]["output_tokens_per_s"] for t in tps]
            ax.plot(tps, values, "o-", color=color, label=label)
            for t, v in zip(tps, values):
                prompts = runs[t].get("num_prompts", 1000)
                note = "" if prompts == 1000 else f" ({prompts} prompts)"
                if run_commits is newer:
                    if t == tps[0]:
                        continue
                    note = f" ({v / values[0]:.2f}x)"
                ax.annotate(f"{v / 1000:.1f}k{note}", (t, v), textcoords="offset points", xytext=offset,
                            fontsize=8, color=color if run_commits is newer else "black")
            if mode:
                base = base or (tps[0], values[0], tps[-1])
                if len(tps) >= 2:
                    cost = {t: 1 / v for t, v in zip(tps, values)}
                    for growing, marker in ((False, "+"), (True, "x")):
                        fits[f"W2 {model} {label}, {_FIT_LABELS[growing]}"] = fit = fit_measured(cost, growing)
                        ax.plot([8], [1 / fit["predicted_step_ms"][8]], marker, color=color, ms=9,
                                label=f"TP=8 predicted, {_FIT_LABELS[growing]}")
        if base is not None:
            t0, v0, t_max = base
            ideal = [t for t in (1, 2, 4, 8) if t0 <= t <= t_max]
            ax.plot(ideal, [v0 * t / t0 for t in ideal], "--", color="gray", label=f"ideal (linear from TP={t0})")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("tensor-parallel degree")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"W2 {model}, 1000 x 512 in / 256 out")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: the points fill the panel
    lat_ax = axes[2]
    runs = scaling_runs(records, device, "W3", "llama-3.1-8b", True, commits)
    if runs:
        tps = sorted(runs)
        values = [runs[t]["seconds_per_request"] for t in tps]
        lat_ax.plot(tps, values, "o-", color="#08519c", label="Albireo, async")
        lat_ax.plot(tps, [values[0] / t for t in tps], "--", color="gray", label="ideal (TP=1 / t)")
        if len(tps) >= 2:
            for growing, marker in ((False, "+"), (True, "x")):
                fits[f"W3 llama-3.1-8b, {_FIT_LABELS[growing]}"] = fit = fit_measured(dict(zip(tps, values)), growing)
                lat_ax.plot([8], [fit["predicted_step_ms"][8]], marker, color="#08519c", ms=9,
                            label=f"TP=8 predicted, {_FIT_LABELS[growing]}")
        for t, v in zip(tps, values):
            lat_ax.annotate(f"{v:.3f} s", (t, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        lat_ax.set_xscale("log", base=2)
        lat_ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    lat_ax.set_xlabel("tensor-parallel degree")
    lat_ax.set_ylabel("seconds per request")
    lat_ax.set_title("W3 llama-3.1-8b, batch 1, 128 in / 256 out")
    lat_ax.legend(fontsize=8)
    fig.suptitle(f"Tensor-parallel scaling on {device} x4, dummy weights, bf16")
    fig.tight_layout()
    path = out / "tp_scaling.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--out", default="benchmarks/plots")
    parser.add_argument("--tp-device", default="NVIDIA H200", help="the machine whose TP runs to plot")
    parser.add_argument("--tp-commits", default="7229ad0,e9fca44",
                        help="the commits of that machine's runs (session 20's 4 x H200 runs by default: "
                        "7229ad0 and e9fca44 differ only in how the copy-engine all-reduce calls the driver)")
    parser.add_argument("--tp-newer-commits", default="",
                        help="later runs drawn beside them (W2 async of another machine, say)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    records = [r for path in Path(args.results).glob("W*.json") for r in per_mode(json.loads(path.read_text()))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(plot_vs_vllm(records, out))
    path, fits = plot_tp_scaling(records, args.tp_device, set(args.tp_commits.split(",")), out,
                                 set(filter(None, args.tp_newer_commits.split(","))))
    print(path)
    for name, fit in fits.items():
        print(f"{name}: cost(t) = {fit['shrinking']:.4g} / t + {fit['not_shrinking']:.4g} + {fit['growing']:.4g} (t - 1); "
              "predicted speedup "
              + ", ".join(f"TP={t} {v:.2f}x" for t, v in fit["predicted_speedup"].items())
              + f"; best TP {fit['predicted_best_tp']}")


if __name__ == "__main__":
    main()
