#!/usr/bin/env bash
# Tensor-parallel scaling on one machine of several GPUs, in stages that each fit one device call:
#   source tests/device/setup.sh; [TP_DEGREES="1 2 4 8"] bash bench/run_tp_scaling.sh OUT_DIR STAGE
#   correctness: TP=t equals TP=1 on GPUs, the peer-memory all-reduce against NCCL (tests), and
#                all-reduce latency: NCCL, PyTorch two-shot, our one-shot alone and with the norm
#   w3:          W3 at each degree, and at TP=2 with NCCL alone (A/B on one machine)
#   w3-only:     W3 at each degree
#   w2-8b:       W2 on llama-3.1-8b at each degree, async on and off
#   w2-8b-async: W2 on llama-3.1-8b at each degree, async on
#   headline:    W3, then W2 on llama-3.1-8b with async scheduling, at each degree (issue 4's ratios)
#   w2-32b:      W2 on qwen2.5-32b at each degree, async on and off (TP=1 with 200 prompts: its KV
#                pool holds few sequences next to 64 GB of weights)
#   profile:     kernel tables of W3 decode steps at TP=1 and TP=2, and each kernel's share of the
#                chain (bench/critical_path.py on every rank's trace: where TP=2's extra time goes,
#                and what each all-reduce waited for its peer)
#   profile-w2:  the same for W2's decode steps of 512 sequences
#   extra:       the W5 amdahl breakdown, sequence-parallel sampling on GPUs
#   share:       on one GPU, W2 on llama-3.1-8b and on one rank's share of it at each degree past 1
#                (bench/rank_share.py): the share's time is a rank's without the exchanges
#   ce:          W2 on llama-3.1-8b at each degree past 1 with prompt steps of 16384 and of 8192
#                tokens, the copy-engine all-reduce on above 32 MiB and off, alternating, and the micro-
#                benchmark of its layer (benchmarks/results/ce-tp4-h200x4-dd9d926.txt)
# W2 runs at most MAX_NUM_SEQS sequences at once (default 512; vLLM's own default is 1024).
# Each W2/W3 run writes a record with its per-step breakdown (--profile-steps) and energy.
set -uo pipefail
out=$1; stage=$2
degrees=${TP_DEGREES:-"1 2 4"}
run() { timeout "$1" "${@:2}" 2>&1 | grep -v "it/s\]\|req/s\]\|graph/s\]\|s/it\]" | tail -n 6; }
w2() {  # w2 MODEL TP EXTRA_FLAGS... (MODEL: a shape in benchmarks/models/, or a model directory)
  model=$1; [ -d "$model" ] || model="benchmarks/models/$1"
  run 300 python3 -m albireo.entrypoints.cli bench throughput --workload W2 --model "$model" \
    --tensor-parallel-size "$2" --num-prompts "${NUM_PROMPTS:-1000}" --input-len 512 --output-len 256 \
    --max-num-seqs "${MAX_NUM_SEQS:-512}" --max-num-batched-tokens 16384 --load-format dummy --max-model-len 2048 \
    --profile-steps --out-dir "$out" "${@:3}"
}
w3() {  # w3 TP EXTRA_FLAGS...
  run 150 python3 -m albireo.entrypoints.cli bench latency --workload W3 --model benchmarks/models/llama-3.1-8b \
    --tensor-parallel-size "$1" --batch-size 1 --input-len 128 --output-len 256 --iters 5 --max-num-seqs 8 \
    --load-format dummy --max-model-len 2048 --profile-steps --out-dir "$out" "${@:2}"
}
profile() {  # profile NAME TP PROMPTS INPUT_LEN MAX_NUM_SEQS SKIP_STEPS STEPS: kernel table, trace, critical path
  run 200 python3 bench/profile_steps.py --model benchmarks/models/llama-3.1-8b --num-prompts "$3" --input-len "$4" \
    --output-len 64 --max-num-seqs "$5" --skip-steps "$6" --steps "$7" --tensor-parallel-size "$2" \
    --out "$out/prof_$1_tp$2.txt" --trace "$out/$1_tp$2.json.gz"
  python3 bench/critical_path.py "$out/$1_tp$2.json.gz" $(ls "$out/$1_tp$2".rank*.json.gz 2>/dev/null) --steps "$7" \
    --spread _push_all_reduce | tee "$out/critical_path_$1_tp$2.txt"
}
case $stage in
  correctness)
    nvidia-smi topo -m | head -10
    run 300 python3 -m pytest -q tests/device/test_symm_all_reduce.py tests/device/test_e2e_gpu.py -k "symm or several_gpus"
    run 150 python3 bench/allreduce.py --tp 2 4 8 --out "$out" ;;
  w3)
    for t in $degrees; do w3 "$t"; done
    w3 2 --all-reduce nccl ;;
  w3-only)
    for t in $degrees; do w3 "$t"; done ;;
  headline)
    for t in $degrees; do w3 "$t"; done
    for t in $degrees; do w2 llama-3.1-8b "$t"; done ;;
  w2-8b-async)
    for t in $degrees; do w2 llama-3.1-8b "$t"; done ;;
  w2-8b)
    for t in $degrees; do w2 llama-3.1-8b "$t"; done
    for t in $degrees; do w2 llama-3.1-8b "$t" --no-async-scheduling; done ;;
  w2-32b)
    for t in $degrees; do
      [ "$t" = 1 ] && prompts=200 || prompts=1000
      NUM_PROMPTS=$prompts w2 qwen2.5-32b "$t"
      NUM_PROMPTS=$prompts w2 qwen2.5-32b "$t" --no-async-scheduling
    done ;;
  profile)
    for t in 1 2; do profile w3 "$t" 1 128 8 10 30; done ;;
  profile-w2)
    for t in 1 2; do profile w2 "$t" 512 512 512 40 5; done ;;
  share)
    w2 llama-3.1-8b 1
    for t in $degrees; do
      [ "$t" = 1 ] && continue
      python3 bench/rank_share.py benchmarks/models/llama-3.1-8b "$t" "$out/llama-3.1-8b-tp$t-share"
      w2 "$out/llama-3.1-8b-tp$t-share" 1
    done ;;
  ce)
    for t in $degrees; do
      [ "$t" = 1 ] && continue
      run 120 python3 bench/row_parallel_allreduce.py --tp "$t" --rows 4096 8192 16384 --decode-rows
      for tokens in 16384 8192; do
        for on in 1 0 1 0; do
          echo "TP=$t, $tokens-token steps, ALBIREO_CE_ALL_REDUCE=$on"
          ALBIREO_CE_ALL_REDUCE=$on ALBIREO_CE_ALL_REDUCE_ABOVE_BYTES=$((32 * 2**20)) w2 llama-3.1-8b "$t" --max-num-batched-tokens "$tokens"
        done
      done
    done ;;
  extra)
    bash bench/run_workloads.sh "$out" W5-amdahl
    run 120 python3 bench/seq_parallel_sampling.py --tp $degrees --batch 256 --out "$out/seq-parallel-sampling.json" ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
