#!/usr/bin/env bash
# The measurements that decide the next changes, in one device call (one H100 for the first two,
# two GPUs for the third):
#   source tests/device/setup.sh; bash bench/run_diagnostics.sh OUT_DIR
#   1. W1's first three steps, kernel table and Chrome trace: why steps 0 and 1 take ~60 ms to launch
#      where later prefill steps take ~10 ms (first_steps_w1.txt, first_steps_w1.json.gz).
#   2. W5's first three steps likewise (the prefill steps before its decode).
#   3. With two GPUs: W2 at TP=2, kernel table of rank 0 over a prefill-heavy stretch, to see how much of
#      a 16k-token step the all-reduces take (prefill_w2_tp2.txt).
set -uo pipefail
out=$1
mkdir -p "$out"
run() { timeout "$1" "${@:2}" 2>&1 | grep -v "it/s\]\|req/s\]\|graph/s\]\|s/it\]" | tail -n 3; }
models=benchmarks/models
run 240 python3 bench/profile_steps.py --model $models/llama-3.2-1b --num-prompts 1000 --input-len 1024 \
  --output-len 128 --max-num-seqs 1024 --skip-steps 0 --steps 3 --out "$out/first_steps_w1.txt" \
  --trace "$out/first_steps_w1.json"
run 240 python3 bench/profile_steps.py --model $models/llama-3.2-1b --num-prompts 1000 --input-len 128 \
  --output-len 512 --max-num-seqs 1024 --skip-steps 0 --steps 3 --out "$out/first_steps_w5.txt" \
  --trace "$out/first_steps_w5.json"
gzip -f "$out"/first_steps_w*.json
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run 300 python3 bench/profile_steps.py --model $models/llama-3.1-8b --num-prompts 200 --input-len 512 \
    --output-len 16 --max-num-seqs 512 --skip-steps 1 --steps 3 --tensor-parallel-size 2 \
    --out "$out/prefill_w2_tp2.txt"
fi
