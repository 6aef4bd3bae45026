#!/usr/bin/env bash
# The default run in bf16 against fp32 (docs/performance.md, "bf16 training: accuracy"): the embedded
# default config, train.steps steps, for each seed once with train.precision = "fp32" and once with "bf16";
# then scripts/bf16_report.py pairs the runs by seed (final validation loss difference with its t interval)
# and draws the loss curves. Runs are sequential (each takes the machine's cores); a finished run is kept,
# so the script can be re-run after an interruption.
#   scripts/bf16-accuracy.sh [OUT=runs/bf16-accuracy]   (environment: SEEDS="1 2 3", STEPS=1500, MOEFORGE)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
moeforge=${MOEFORGE:-$here/build/moeforge}
out=${1:-runs/bf16-accuracy}
seeds=${SEEDS:-1 2 3}
steps=${STEPS:-1500}
cd "$here"  # data.dir = "data" (Brown) is relative to the repository
mkdir -p "$out"
"$moeforge" info 2>/dev/null | head -n 3 >"$out/machine.txt"
for seed in $seeds; do
  for p in fp32 bf16; do
    run="$out/$p-seed$seed"
    if [ -f "$run/metrics.jsonl" ] && grep '"split":"validation"' "$run/metrics.jsonl" | grep -q "\"step\":$steps[,}]"; then
      continue
    fi
    echo "== $p seed $seed"
    "$moeforge" train --out "$run" --overwrite --no-report --set train.precision="\"$p\"" \
      --set train.seed="$seed" --set train.steps="$steps" >"$run.log" 2>&1
  done
done
/usr/bin/python3 "$here/scripts/bf16_report.py" "$out"
