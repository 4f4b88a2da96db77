#!/usr/bin/env bash
# W3 (or W2: WORKLOAD=W2) for several source trees of the engine on one machine in one call, runs
# interleaved so that drift hits every tree alike; each run is run_tp_scaling.sh's. Unpack each
# revision beside the repo first (here, before the call):
#   mkdir -p exp/NAME && git archive REV albireo tests | tar -x -C exp/NAME
# then on the GPU machine:
#   source tests/device/setup.sh; TP_DEGREES="1 2" bash bench/compare_trees.sh OUT LABEL=DIR...
# DIR "." is the working tree. Each record is labelled LABEL (its `commit` field).
set -uo pipefail
out=$1; shift
base=$PYTHONPATH
# Without it `python3 -m` puts the working directory (this repo) before PYTHONPATH, and every label
# would run the working tree's code.
export PYTHONSAFEPATH=1
case ${WORKLOAD:-W3} in
  W3) stage=w3-only ;;
  W2) stage=w2-8b-async ;;
  *) echo "WORKLOAD is W3 or W2" >&2; exit 2 ;;
esac
for t in ${TP_DEGREES:-"1 2"}; do
  for spec in "$@"; do
    label=${spec%%=*}; dir=$(cd "${spec#*=}" && pwd)
    echo "== $label TP=$t"
    ALBIREO_COMMIT=$label PYTHONPATH=$dir:$base TP_DEGREES=$t bash "$(dirname "$0")/run_tp_scaling.sh" "$out" $stage \
      2>&1 | grep -v "warn" | tail -n 3
  done
done
