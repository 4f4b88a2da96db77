#!/usr/bin/env bash
# Tensor-parallel scaling on a machine with up to 4 GPUs, in stages that each fit one device call:
#   source tests/device/setup.sh; bash bench/run_tp_scaling.sh OUT_DIR STAGE
#   correctness: TP=2 and TP=4 equal TP=1 on GPUs; NCCL all-reduce latency; W3 at TP=1,2,4
#   w2-8b:       W2 on llama-3.1-8b at TP=1,2,4, async on and off, each with its step breakdown
#   w2-32b:      W2 on qwen2.5-32b at TP=2,4, async on and off
#   symm:        all-reduce over peer memory: its tests, its latency vs NCCL, W3 at TP=1,2,4 with it
#                and at TP=2 with NCCL alone (A/B on one machine)
#   push:        the peer-memory all-reduce's tests and latency, W2 at TP=1,2,4, qwen2.5-32b at TP=1
#   sync-32b:    W2 llama-3.1-8b at TP=1,2,4 with async off; qwen2.5-32b at TP=2,4, async on and off
#   w3-w2:       W3 and W2 (llama-3.1-8b) at TP=1,2,4, async on
#   symm-e2e:    TP=2 and TP=4 equal TP=1 on GPUs, W2 at TP=1,2,4 and at TP=2 with NCCL alone
#   profile:     kernel tables of a W3 decode step at TP=1 and TP=2 (where TP=2's extra time goes)
#   extra:       qwen2.5-32b at TP=1 (200 prompts: its KV pool holds ~26 sequences), the W5 amdahl
#                breakdown, sequence-parallel sampling on GPUs
set -uo pipefail
out=$1; stage=$2
degrees=${TP_DEGREES:-"1 2 4"}
run() { timeout "$1" "${@:2}" 2>&1 | grep -v "it/s\]\|req/s\]\|graph/s\]\|s/it\]" | tail -n 6; }
w2() {  # w2 MODEL TP EXTRA_FLAGS...
  run 300 python3 -m albireo.entrypoints.cli bench throughput --workload W2 --model "benchmarks/models/$1" \
    --tensor-parallel-size "$2" --num-prompts "${NUM_PROMPTS:-1000}" --input-len 512 --output-len 256 \
    --max-num-seqs 512 --max-num-batched-tokens 16384 --load-format dummy --max-model-len 2048 \
    --profile-steps --out-dir "$out" "${@:3}"
}
w3() {  # w3 TP EXTRA_FLAGS...
  run 150 python3 -m albireo.entrypoints.cli bench latency --workload W3 --model benchmarks/models/llama-3.1-8b \
    --tensor-parallel-size "$1" --batch-size 1 --input-len 128 --output-len 256 --iters 5 --max-num-seqs 8 \
    --load-format dummy --max-model-len 2048 --profile-steps --out-dir "$out" "${@:2}"
}
case $stage in
  correctness)
    nvidia-smi topo -m | head -8
    run 240 python3 -m pytest -q tests/device/test_e2e_gpu.py -k several_gpus
    run 120 python3 bench/allreduce.py --tp 2 4 --out "$out"
    for t in $degrees; do w3 "$t"; done ;;
  symm)
    run 240 python3 -m pytest -q tests/device/test_symm_all_reduce.py || exit 1
    run 120 python3 bench/allreduce.py --tp 2 4 --out "$out"
    for t in $degrees; do w3 "$t"; done
    w3 2 --all-reduce nccl ;;
  push)
    run 240 python3 -m pytest -q tests/device/test_symm_all_reduce.py
    run 120 python3 bench/allreduce.py --tp 2 4 --out "$out"
    for t in $degrees; do w2 llama-3.1-8b "$t"; done
    NUM_PROMPTS=200 w2 qwen2.5-32b 1 ;;
  sync-32b)
    for t in $degrees; do w2 llama-3.1-8b "$t" --no-async-scheduling; done
    for t in 2 4; do w2 qwen2.5-32b "$t"; w2 qwen2.5-32b "$t" --no-async-scheduling; done ;;
  w3-w2)
    for t in $degrees; do w3 "$t"; done
    for t in $degrees; do w2 llama-3.1-8b "$t"; done ;;
  symm-e2e)
    run 300 python3 -m pytest -q tests/device/test_e2e_gpu.py -k several_gpus
    for t in $degrees; do w2 llama-3.1-8b "$t"; done
    w2 llama-3.1-8b 2 --all-reduce nccl ;;
  w2-8b)
    for t in $degrees; do w2 llama-3.1-8b "$t"; done
    for t in $degrees; do w2 llama-3.1-8b "$t" --no-async-scheduling; done ;;
  w2-32b)
    for t in 2 4; do w2 qwen2.5-32b "$t"; done
    for t in 2 4; do w2 qwen2.5-32b "$t" --no-async-scheduling; done ;;
  profile)
    for t in 1 2; do
      run 200 python3 bench/profile_steps.py --model benchmarks/models/llama-3.1-8b --num-prompts 1 --input-len 128 \
        --output-len 64 --max-num-seqs 8 --tensor-parallel-size "$t" --out "$out/prof_w3_tp$t.txt"
    done ;;
  extra)
    NUM_PROMPTS=200 w2 qwen2.5-32b 1
    bash bench/run_workloads.sh "$out" W5-amdahl
    run 120 python3 bench/seq_parallel_sampling.py --tp 1 2 4 --batch 256 --out "$out/seq-parallel-sampling.json" ;;
esac
