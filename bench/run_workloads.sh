#!/usr/bin/env bash
# Run BENCHMARKS.md workloads on the GPU machine: bench/run_workloads.sh OUT_DIR W1 W3 ...
# (also W5-amdahl: the step breakdown async on and off; multiturn: the KV tier against recompute)
# Extra engine flags for every run may be passed in $EXTRA (e.g. "--enforce-eager").
set -uo pipefail
out=$1; shift
models=benchmarks/models
common="--load-format dummy --max-model-len 2048 --out-dir $out ${EXTRA:-}"
for w in "$@"; do
  case $w in
    W1) python3 -m albireo.entrypoints.cli bench throughput --workload W1 --model $models/llama-3.2-1b \
          --num-prompts 1000 --input-len 1024 --output-len 128 --max-num-seqs 1024 --max-num-batched-tokens 16384 $common ;;
    W2) python3 -m albireo.entrypoints.cli bench throughput --workload W2 --model $models/llama-3.1-8b \
          --num-prompts 1000 --input-len 512 --output-len 256 --max-num-seqs 512 --max-num-batched-tokens 16384 $common ;;
    W3) python3 -m albireo.entrypoints.cli bench latency --workload W3 --model $models/llama-3.1-8b \
          --batch-size 1 --input-len 128 --output-len 256 --iters 5 --max-num-seqs 8 $common ;;
    W5) python3 -m albireo.entrypoints.cli bench throughput --workload W5 --model $models/llama-3.2-1b \
          --num-prompts 1000 --input-len 128 --output-len 512 --max-num-seqs 1024 --max-num-batched-tokens 16384 $common ;;
    W5-amdahl) python3 -m albireo.entrypoints.cli bench amdahl --workload W5 --model $models/llama-3.2-1b \
          --max-num-seqs 1024 --max-num-batched-tokens 16384 $common ;;
    multiturn) python3 -m albireo.entrypoints.cli bench multiturn --model $models/llama-3.1-8b --max-num-seqs 8 \
          --num-kv-blocks 600 --kv-offload-gb 8 --load-format dummy --max-model-len 8192 --out-dir $out ${EXTRA:-} ;;
    smoke) python3 -m albireo.entrypoints.cli bench throughput --workload smoke --model $models/llama-3.2-1b \
          --num-prompts 200 --input-len 128 --output-len 64 --max-num-seqs 256 $common ;;
  esac 2>&1 | grep -v "it/s\]\|req/s\]\|graph/s\]" | tail -n 8
done
