"""The benchmark commands write the records BENCHMARKS.md asks for; the Amdahl model predicts sanely."""

import json
import time

import pytest

from albireo.bench.amdahl import predict
from albireo.bench.ranks import run_ranks
from albireo.entrypoints.cli import main
from albireo.profiling.step_timeline import StepSummary


def summary(wall: float, forward: float, sample: float) -> StepSummary:
    phases = {"schedule": 0, "launch": 0, "wait": 0, "update": 0, "forward": forward, "sample": sample, "gpu_idle": 0}
    return StepSummary(num_steps=10, wall_ms=wall, phases_ms=phases)


def test_no_serial_part_means_tp_keeps_paying():
    p = predict(summary(10.0, 9.0, 1.0), allreduces_per_step=0, allreduce_us=0.0)
    assert p["predicted_speedup"][8] == 8.0
    assert p["predicted_best_tp"] == 16


def test_a_large_serial_part_stops_tp_early():
    # 5 ms of GPU work and 5 ms serial: t=2 gives 10/7.5, t=4 gives 10/6.25 (+20%), t=8 10/5.625 (+11%)
    p = predict(summary(10.0, 4.0, 1.0), allreduces_per_step=0, allreduce_us=0.0)
    assert abs(p["predicted_speedup"][2] - 10 / 7.5) < 1e-9
    assert p["predicted_best_tp"] == 8


def test_serial_fraction_is_the_share_of_wall_time_outside_gpu_work():
    assert summary(10.0, 6.0, 1.0).serial_fraction == 0.3


def test_bench_throughput_and_amdahl_write_records(tiny_model, tmp_path):
    path = tiny_model("llama")
    common = ["--model", path, "--num-prompts", "6", "--input-len", "8", "--output-len", "4", "--out-dir", str(tmp_path)]
    main(["bench", "throughput", "--workload", "W5", *common])
    main(["bench", "amdahl", "--workload", "W5", *common])
    assert len(list(tmp_path.glob("*.json"))) == 2
    for record in (json.loads(p.read_text()) for p in tmp_path.glob("*.json")):
        assert {"workload", "model", "tp", "device", "torch", "commit", "date"} <= set(record)
        if "modes" in record:
            assert set(record["modes"]) == {"async", "sync"}
            assert record["modes"]["async"]["steps"] > 0
        else:
            assert record["output_tokens_per_s"] > 0 and record["async_scheduling"] is True
            assert record["num_prompts"] == 6
    assert list(tmp_path.glob("amdahl-*.png"))


def test_profiled_tp2_throughput_and_latency_records_carry_the_step_breakdown(tiny_model, tmp_path):
    path = tiny_model("llama")
    common = ["--model", path, "--input-len", "8", "--output-len", "4", "--tensor-parallel-size", "2",
              "--profile-steps", "--out-dir", str(tmp_path)]
    main(["bench", "throughput", "--workload", "W2", "--num-prompts", "6", *common])
    main(["bench", "latency", "--workload", "W3", "--iters", "2", "--warmup-iters", "1", *common])
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert [r["workload"] for r in records] == ["W2", "W3"]
    for record in records:
        assert record["tp"] == 2
        breakdown = record["step_breakdown"]
        assert breakdown["steps"] > 0 and breakdown["phases_ms_per_step"]["forward"] > 0
        assert 0 <= breakdown["serial_fraction"] <= 1


def test_bench_multiturn_compares_the_host_tier_with_recompute(tiny_model, tmp_path):
    main(["bench", "multiturn", "--model", tiny_model("llama"), "--num-conversations", "3", "--turns", "2",
          "--system-len", "20", "--user-len", "16", "--output-len", "3", "--num-kv-blocks", "4",
          "--max-model-len", "64", "--kv-offload-gb", "0.01", "--out-dir", str(tmp_path)])
    (record,) = (json.loads(p.read_text()) for p in tmp_path.glob("multiturn-*.json"))
    tier, recompute = record["modes"]["host_tier"], record["modes"]["recompute"]
    assert recompute["host_hit_tokens"] == 0 and tier["host_hit_tokens"] > 0
    assert tier["blocks_loaded"] * 16 == tier["host_hit_tokens"] and tier["blocks_saved"] > 0
    assert record["ttft_p50_ratio"] > 0 and len(tier["ttft_ms_p50_by_turn"]) == 2


def test_fit_separates_what_shrinks_with_tp_from_what_does_not():
    from albireo.bench.amdahl import fit_measured

    fit = fit_measured({1: 4.0 + 4.0, 2: 2.0 + 4.0, 4: 1.0 + 4.0})  # 4 ms shrink, 4 ms do not
    assert abs(fit["shrinking"] - 4.0) < 1e-9 and abs(fit["not_shrinking"] - 4.0) < 1e-9
    assert abs(fit["predicted_speedup"][8] - 8.0 / 4.5) < 1e-9
    assert fit["predicted_best_tp"] == 8  # 16 would gain 4.5 / 4.25 - 1 = 6% over 8: under 10%


def test_fit_of_three_degrees_finds_what_grows_with_each_rank_and_the_best_degree():
    from albireo.bench.amdahl import fit_measured

    fit = fit_measured({t: 8.0 / t + 1.0 + 0.5 * (t - 1) for t in (1, 2, 4)})
    assert [round(fit[k], 9) for k in ("shrinking", "not_shrinking", "growing")] == [8.0, 1.0, 0.5]
    assert abs(fit["predicted_speedup"][8] - 9.0 / 5.5) < 1e-9  # slower than TP=4's 9 / 4.5
    assert fit["predicted_best_tp"] == 4


def test_fit_drops_a_growing_part_that_comes_out_negative():
    from albireo.bench.amdahl import fit_measured

    fit = fit_measured({1: 8.0, 2: 5.0, 4: 3.2})  # TP=4 faster than a / t + b through TP=1 and 2 (3.5)
    assert fit["growing"] == 0.0
    assert fit["shrinking"] > 0 and fit["not_shrinking"] > 0


def test_fit_needs_two_degrees():
    from albireo.bench.amdahl import fit_measured

    with pytest.raises(ValueError, match="two or more TP degrees"):
        fit_measured({1: 3.0})


def _w2_run(tp: int, tok_s: float, commit: str, async_scheduling: bool = True) -> dict:
    return {"device": "GPU", "workload": "W2", "model": "llama-3.1-8b", "commit": commit, "tp": tp,
            "async_scheduling": async_scheduling, "step_breakdown": {}, "output_tokens_per_s": tok_s,
            "date": f"2026-11-27T0{tp}"}


def test_tp_plot_draws_and_fits_newer_runs_beside_the_base_ones(tmp_path):
    import matplotlib

    from albireo.bench.plots import plot_tp_scaling

    matplotlib.use("Agg")
    records = [_w2_run(t, v, "old") for t, v in ((1, 100.0), (2, 180.0), (4, 260.0))]
    records += [_w2_run(t, v, "old", async_scheduling=False) for t, v in ((1, 90.0), (2, 150.0))]
    records += [_w2_run(t, v, "new") for t, v in ((1, 100.0), (2, 183.0), (4, 308.0))]
    path, fits = plot_tp_scaling(records, "GPU", {"old"}, tmp_path, newer={"new"})
    assert path.stat().st_size > 0
    old = fits["W2 llama-3.1-8b async on, cost a / t + b + c (t - 1)"]["predicted_speedup"]
    new = fits["W2 llama-3.1-8b async on, new, cost a / t + b + c (t - 1)"]["predicted_speedup"]
    assert round(old[4], 6) == 2.6 and round(new[4], 6) == 3.08  # three points: the fits go through them
    assert not any("async off" in name for name in fits)  # only async series are fitted


def test_the_chart_against_vllm_takes_the_newest_run_of_the_workloads_own_model():
    from albireo.bench.plots import H100, latest

    run = {"device": H100, "workload": "W2", "tp": 1, "async_scheduling": True}
    records = [{**run, "model": "llama-3.1-8b", "date": "2026-11-28T00:26", "output_tokens_per_s": 10272.0},
               {**run, "model": "llama-3.1-8b-tp2-share", "date": "2026-11-28T00:27", "output_tokens_per_s": 19715.0}]
    assert latest(records, "W2", async_scheduling=True)["output_tokens_per_s"] == 10272.0


def test_the_chart_against_vllm_leaves_out_runs_over_a_float8_kv_cache():
    from albireo.bench.plots import H100, latest

    run = {"device": H100, "workload": "W5", "model": "llama-3.2-1b", "tp": 1, "async_scheduling": True}
    records = [{**run, "date": "2026-11-28T02:14", "kv_cache_dtype": "auto", "output_tokens_per_s": 96182.6},
               {**run, "date": "2026-11-28T02:15", "kv_cache_dtype": "fp8", "output_tokens_per_s": 100231.9}]
    assert latest(records, "W5", async_scheduling=True)["output_tokens_per_s"] == 96182.6


def _rank_1_fails(rank, world, port, queue):
    if rank == 1:
        raise SystemExit(3)
    time.sleep(60)  # rank 0 would wait for its peer in a collective


def test_run_ranks_stops_waiting_as_soon_as_a_rank_fails():
    # Waiting out the timeout would raise queue.Empty instead.
    with pytest.raises(RuntimeError, match="rank 1 of 2 exited with code 3"):
        run_ranks(_rank_1_fails, 2, timeout=50)


def _ranks_time_their_arguments(rank, world, port, queue, rows, side):
    import torch.distributed as dist

    from albireo.bench.ranks import file_times, hand_back

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for r in rows:
        file_times(results, f"R={r}", {"side": float(sum(side)), "rank": float(rank)}, rank)
    hand_back(queue, rank, results)


def test_a_two_rank_rows_benchmark_records_rank_0s_times_for_the_rows_and_options_asked(tmp_path, monkeypatch):
    from albireo.bench.ranks import two_rank_rows_benchmark

    out = tmp_path / "record.json"
    monkeypatch.setattr("sys.argv", ["bench", "--rows", "8", "16", "--side", "3", "--out", str(out)])
    two_rank_rows_benchmark("probe", "doc", _ranks_time_their_arguments, "us", 4, 60, ("--side", [1, 2]))
    record = json.loads(out.read_text())
    assert record["results"] == {"R=8": {"side": 3.0, "rank": 0.0}, "R=16": {"side": 3.0, "rank": 0.0}}
    assert (record["benchmark"], record["unit"], record["calls_per_graph"], record["device"]) == ("probe", "us", 4, "cpu")
