#!/usr/bin/env bash
# On the two-GPU machine: TP=2 correctness, then W2 and W3 at TP=1 and TP=2 in one run (the
# comparison issue 4 asks for), the all-gather sampling baseline, and the Amdahl breakdown.
#   source tests/device/setup.sh; bash bench/run_tp2.sh OUT_DIR
set -uo pipefail
out=$1
python3 -m pytest -q tests/device/test_e2e_gpu.py -k "several_gpus and not 4-" 2>&1 | tail -3
bash bench/run_workloads.sh "$out" W3 W2
EXTRA="--tensor-parallel-size 2" bash bench/run_workloads.sh "$out" W3 W2
EXTRA="--tensor-parallel-size 2 --tp-sampling all_gather" bash bench/run_workloads.sh "$out" W2
bash bench/run_workloads.sh "$out" W5-amdahl
