"""bench/critical_path.py charges each kernel with the time from the previous kernel's end to its own."""

import gzip
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "critical_path", Path(__file__).resolve().parents[1] / "bench" / "critical_path.py")
critical_path = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(critical_path)


def _kernel(name, ts, dur, stream=7):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_overlapping_kernels_are_charged_from_the_previous_end_and_gaps_go_to_idle(tmp_path):
    events = [
        _kernel("gemv<2>(float*)", 0, 10),
        _kernel("all_reduce", 4, 9),  # launched early (PDL): runs on for 3 us after the GEMV
        _kernel("norm", 20, 2),  # 7 us after the last end: idle
        _kernel("other_stream", 0, 100, stream=8),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events + [_kernel("gemv<2>(float*)", 22, 1)]}, f)
    charged, count, span = critical_path.critical_path(critical_path.load_kernels(str(path)))
    assert dict(charged) == {"gemv": 11.0, "all_reduce": 3.0, "(idle)": 7.0, "norm": 2.0}
    assert count["gemv"] == 2 and span == 23.0


def test_spread_shows_each_launch_charge_by_its_place_in_the_step(tmp_path):
    events = []
    for step in range(2):  # two steps of gemm, all-reduce (waits 20 us on the peer), gemm, all-reduce
        t = step * 100
        events += [_kernel("gemm", t, 10), _kernel("all_reduce", t + 10, 25),
                   _kernel("gemm", t + 35, 10), _kernel("all_reduce", t + 45, 5 + step * 2)]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    text = critical_path.spread(critical_path.load_kernels(str(path)), "all_reduce", steps=2)
    assert text.splitlines()[1] == "by place in the step: 25.0 6.0"
    assert "2 a step" in text and "max 25.0" in text
