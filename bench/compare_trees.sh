#!/usr/bin/env bash
# W3 (or W2: WORKLOAD=W2) for several source trees of the engine on one machine in one call, runs
# interleaved so that drift hits every tree alike. Unpack each revision beside the repo first (here,
# before the call):
#   mkdir -p exp/NAME && git archive REV albireo tests | tar -x -C exp/NAME
# then on the GPU machine:
#   source tests/device/setup.sh; TP_DEGREES="1 2" bash bench/compare_trees.sh OUT LABEL=DIR...
# DIR "." is the working tree. Each record is labelled LABEL (its `commit` field).
set -uo pipefail
out=$1; shift
base=$PYTHONPATH
case ${WORKLOAD:-W3} in
  W3) flags=(latency --workload W3 --batch-size 1 --input-len 128 --output-len 256 --iters 5 --max-num-seqs 8) ;;
  W2) flags=(throughput --workload W2 --num-prompts 1000 --input-len 512 --output-len 256 --max-num-seqs 512
             --max-num-batched-tokens 16384) ;;
  *) echo "WORKLOAD is W3 or W2" >&2; exit 2 ;;
esac
for t in ${TP_DEGREES:-"1 2"}; do
  for spec in "$@"; do
    label=${spec%%=*}; dir=$(cd "${spec#*=}" && pwd)
    echo "== $label TP=$t"
    ALBIREO_COMMIT=$label PYTHONPATH=$dir:$base timeout 200 python3 -m albireo.entrypoints.cli bench "${flags[@]}" \
      --model benchmarks/models/llama-3.1-8b --tensor-parallel-size "$t" --load-format dummy --max-model-len 2048 \
      --profile-steps --out-dir "$out" 2>&1 | grep -v "it/s\]\|req/s\]\|graph/s\]\|s/it\]\|warn" | tail -n 3
  done
done
