#!/usr/bin/env bash
# Data parallelism's cost on this machine (docs/distributed.md, "Measured"): the same training steps at
# 1 rank x 2 threads and at 2 ranks x 1 thread (the fair comparison on 2 cores), for the default model and
# a wider one, data parallel and with the experts sharded (dist.expert_parallel=2). Prints tokens/s and
# what rank 0's collectives (and the all-to-alls among them) moved and cost per step.
#
#   scripts/dist-bench.sh [STEPS]        # default 40
#   MOEFORGE=build/moeforge DATA_DIR=data scripts/dist-bench.sh 40
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${MOEFORGE:-$here/build/moeforge}
steps=${1:-40}
data_dir=${DATA_DIR:-$here/data}
out=${OUT:-$(mktemp -d /tmp/moeforge-dist-bench.XXXXXX)}
common=(--set train.steps="$steps" --set train.eval_every=0 --set train.eval_batches=1 --set train.log_every=1
        --set train.warmup=10 --set "data.dir=\"$data_dir\"")
wide=(--set model.d_model=256 --set model.d_ff=688 --set moe.d_expert=344)

last_tok_s() { grep "\"split\":\"train\"" "$1/metrics.jsonl" | tail -n 1 | sed -E 's/.*"tokens_per_s":([0-9.]+).*/\1/'; }

run() {  # name world threads extra...
  local name=$1 world=$2 threads=$3
  shift 3
  local dir=$out/$name
  if [ "$world" = 1 ]; then
    "$bin" train "${common[@]}" --set train.threads="$threads" "$@" --out "$dir" --no-report >"$dir.log0" 2>&1
  else
    local port=$((20000 + RANDOM % 20000)) pids=()
    for ((r = 0; r < world; r++)); do
      RANK=$r WORLD_SIZE=$world MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        "$bin" train "${common[@]}" --set train.threads="$threads" "$@" --out "$dir" --no-report >"$dir.log$r" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
  fi
  printf '%-22s %d rank(s) x %d thread(s): %8.0f tokens/s' "$name" "$world" "$threads" "$(last_tok_s "$dir")"
  grep -h "^dist: rank 0:" "$dir.log0" | sed 's/^dist: rank 0:/;/' || true
  echo
}

echo "# $steps steps each; runs in $out"
run default-1x2 1 2
run default-2x1 2 1
run wide-1x2 1 2 "${wide[@]}"
run wide-2x1 2 1 "${wide[@]}"
run default-2x1-ep 2 1 --set dist.expert_parallel=2
run wide-2x1-ep 2 1 "${wide[@]}" --set dist.expert_parallel=2
