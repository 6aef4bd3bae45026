#!/usr/bin/env bash
# bf16 inference against fp32 inference (docs/performance.md, "bf16 inference: accuracy"): every final
# checkpoint of scripts/bf16-accuracy.sh's runs (the default run, seeds 1-3, trained in fp32 and in bf16) is
# evaluated on the whole validation split with `eval --dtype fp32` and `eval --dtype bf16`; the per-checkpoint
# differences are paired (a 95% t interval over the 6 checkpoints, and over each training precision's 3).
#   scripts/bf16-inference-accuracy.sh [RUNS=runs/bf16-accuracy] [OUT=docs/performance/bf16-inference.json]
#   (environment: MOEFORGE)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
moeforge=${MOEFORGE:-$here/build/moeforge}
runs=${1:-runs/bf16-accuracy}
out=${2:-docs/performance/bf16-inference.json}
cd "$here"  # data.dir = "data" (Brown) is relative to the repository
tmp=$(mktemp)
trap 'rm -f "$tmp" "$tmp.out"' EXIT
for run in "$runs"/fp32-seed*/ "$runs"/bf16-seed*/; do
  run=${run%/}
  for d in fp32 bf16; do
    if ! "$moeforge" eval --checkpoint "$run/checkpoints" --dtype "$d" >"$tmp.out" 2>&1; then
      echo "bf16-inference-accuracy: eval of $run with --dtype $d failed:" >&2
      tail -n 3 "$tmp.out" >&2
      exit 1
    fi
    loss=$(sed -n 's/^validation: loss \([0-9.]*\),.*/\1/p' "$tmp.out")
    [ -n "$loss" ] || { echo "bf16-inference-accuracy: no validation loss from $run ($d)" >&2; exit 1; }
    echo "$(basename "$run") $d $loss" | tee -a "$tmp"
  done
done
/usr/bin/python3 - "$tmp" "$out" <<'PY'
import json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
from paired_t import paired_interval
rows = {}
for line in open(sys.argv[1]):
    run, dtype, loss = line.split()
    rows.setdefault(run, {})[dtype] = float(loss)
diffs = {run: v["bf16"] - v["fp32"] for run, v in rows.items()}
result = {"checkpoints": rows, "bf16_minus_fp32": diffs,
          "all": paired_interval(list(diffs.values())),
          "trained_fp32": paired_interval([d for r, d in diffs.items() if r.startswith("fp32")]),
          "trained_bf16": paired_interval([d for r, d in diffs.items() if r.startswith("bf16")])}
with open(sys.argv[2], "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
for k in ("all", "trained_fp32", "trained_bf16"):
    s = result[k]
    print("%-13s bf16 - fp32 inference: %+.5f nats [%+.5f, %+.5f] (n %d)" % (k, s["mean"], s["lo"], s["hi"], s["n"]))
PY
