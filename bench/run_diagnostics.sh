#!/usr/bin/env bash
# The measurements that decide the next changes, in one device call (two GPUs; the TP=2 parts are
# skipped on one):
#   source tests/device/setup.sh; bash bench/run_diagnostics.sh OUT_DIR [w1] [w2]
# (W3's decode kernel tables at TP=1 and TP=2: bench/run_tp_scaling.sh OUT profile)
#   w1: W1's and W5's first three steps, kernel tables and Chrome traces: why steps 0 and 1 take
#       ~60 ms to launch where later prefill steps take ~10 ms (first_steps_w1/w5.txt, .json.gz).
#   w2: W2 at TP=1 and TP=2, kernel tables over decode steps of 512 sequences and (TP=2) over
#       16k-token prefill steps: the all-reduces' share of each (decode_w2_tp*.txt, prefill_w2_tp2.txt).
set -uo pipefail
out=$1; shift
parts=${*:-w1 w2}
mkdir -p "$out"
run() { timeout "$1" "${@:2}" 2>&1 | grep -v "it/s\]\|req/s\]\|graph/s\]\|s/it\]" | tail -n 3; }
gpus=$(nvidia-smi -L | wc -l)
models=benchmarks/models
profile() { run 300 python3 bench/profile_steps.py --model $models/$1 "${@:2}"; }
for part in $parts; do
  case $part in
    w1)
      profile llama-3.2-1b --num-prompts 1000 --input-len 1024 --output-len 128 --max-num-seqs 1024 --skip-steps 0 \
        --steps 3 --out "$out/first_steps_w1.txt" --trace "$out/first_steps_w1.json"
      profile llama-3.2-1b --num-prompts 1000 --input-len 128 --output-len 512 --max-num-seqs 1024 --skip-steps 0 \
        --steps 3 --out "$out/first_steps_w5.txt" --trace "$out/first_steps_w5.json"
      gzip -f "$out"/first_steps_w*.json ;;
    w2)
      for tp in 1 2; do
        [ "$tp" -le "$gpus" ] || continue
        profile llama-3.1-8b --num-prompts 512 --input-len 512 --output-len 40 --max-num-seqs 512 --skip-steps 24 \
          --steps 5 --tensor-parallel-size $tp --out "$out/decode_w2_tp$tp.txt"
      done
      if [ "$gpus" -ge 2 ]; then
        profile llama-3.1-8b --num-prompts 200 --input-len 512 --output-len 16 --max-num-seqs 512 --skip-steps 1 \
          --steps 3 --tensor-parallel-size 2 --out "$out/prefill_w2_tp2.txt"
      fi ;;
  esac
done
