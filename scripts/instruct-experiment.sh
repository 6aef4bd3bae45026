#!/usr/bin/env bash
# MoCE's own setting, end to end (docs/instruct.md): pretrain a dense model on Brown, upcycle it to
# adapter experts (PESC: the frozen dense FFN plus small per-expert adapters) under two routers, and
# instruction-tune three variants on the same data, steps and active compute, for every seed:
#   moce   16 adapters, 4 clusters of 4, top-2 inside the prompt's cluster (moe.moce_pool = "prompt",
#          offline k-means on the prompts' representation)
#   topk   16 adapters, one router over all of them, top-2
#   dense  one adapter twice as wide (the same active adapter width, no routing)
# then scores each on the held-out and held-in tasks (moeforge eval --split heldout) and writes the report.
#
#   scripts/instruct-experiment.sh [OUT] [REPORT]     (default runs/instruct-exp, docs/results/instruct)
# Env: SEEDS ("1 2 3"), BASE_STEPS (800), STEPS (500), PER_TASK (30), MOEFORGE (build/moeforge),
# INSTRUCT_SET (extra --set arguments for the instruction-tuning runs, e.g. smaller data for a smoke test).
# A finished step (its checkpoint or tasks.json exists) is not redone, so an interrupted run resumes.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/runs/instruct-exp}
report=${2:-$here/docs/results/instruct}
mf=${MOEFORGE:-$here/build/moeforge}
seeds=${SEEDS:-1 2 3}
base_steps=${BASE_STEPS:-800}
steps=${STEPS:-500}
per_task=${PER_TASK:-30}
mkdir -p "$out"
start=$(date +%s)
log() { echo "[$(($(date +%s) - start))s] $*"; }

# 1. The dense base model on Brown (the default run's model with dense FFNs in every layer).
if [ ! -e "$out/base/checkpoints/latest" ]; then
  log "pretraining the dense base ($base_steps steps)"
  # Byte pieces in the tokenizer (as the committed docs/results/instruct was run), so that the tuned models
  # can encode any character of a prompt.
  "$mf" train --out "$out/base" --no-report --set model.moe_every=0 --set train.steps="$base_steps" \
    --set train.eval_every=0 --set train.eval_batches=8 --set data.byte_fallback=true
fi

# 2. Upcycled models: adapter experts on the frozen dense FFN in every layer.
common=(--set model.moe_every=1 --set moe.expert_form='"adapter"' --set moe.d_expert=344
  --set moe.capacity_factor=0.0 --set moe.balance_coef=0.01 --set moe.z_loss_coef=0.001)
upcycle() {
  local name=$1
  shift
  if [ ! -e "$out/up-$name/manifest.json" ]; then
    log "upcycling: $name"
    "$mf" upcycle --checkpoint "$out/base/checkpoints" --out "$out/up-$name" "${common[@]}" "$@"
  fi
}
upcycle moce --set moe.router='"moce"' --set moe.n_expert=16 --set moe.n_cluster=4 --set moe.n_expert_used=2 \
  --set moe.adapter_dim=32 --set moe.moce_n_general=0
upcycle topk --set moe.router='"topk"' --set moe.n_expert=16 --set moe.n_expert_used=2 --set moe.adapter_dim=32
upcycle dense --set moe.router='"topk"' --set moe.n_expert=1 --set moe.n_expert_used=1 --set moe.adapter_dim=64

# 3. Instruction tuning and task scores, seed-major (every variant's seed 1 first).
instruct=(--set data.corpus='"instruct"' --set 'data.heldout_genres=[]' --set data.instruct_pack=false
  --set train.steps="$steps" --set train.warmup=40 --set train.lr=2e-3 --set train.eval_every=0
  --set train.eval_batches=8 --set train.log_every=10)
read -r -a instruct_extra <<<"${INSTRUCT_SET:-}"
for seed in $seeds; do
  for v in moce topk dense; do
    run="$out/$v/seed$seed"
    extra=()
    # The prompt pool needs instruction rows, so it is set here rather than when upcycling.
    [ "$v" = moce ] && extra=(--set moe.moce_pool='"prompt"' --set moe.moce_clustering='"hidden"')
    if [ ! -e "$run/checkpoints/latest" ]; then
      log "instruction-tuning $v, seed $seed ($steps steps)"
      rm -rf "$run"
      "$mf" train --init "$out/up-$v" --out "$run" --no-report "${instruct[@]}" --set train.seed="$seed" \
        --set data.seed=1234 "${extra[@]}" "${instruct_extra[@]}" >"$out/$v-seed$seed.log" 2>&1 ||
        { tail -20 "$out/$v-seed$seed.log"; exit 1; }
    fi
    if [ ! -e "$run/tasks.json" ]; then
      log "scoring $v, seed $seed"
      "$mf" eval --checkpoint "$run/checkpoints" --split heldout --per-task "$per_task" --max-new-tokens 24 \
        --json "$run/tasks.json" >"$run/eval.txt" 2>&1 || { tail -20 "$run/eval.txt"; exit 1; }
      grep "accuracy" "$run/eval.txt" | tail -1
    fi
  done
done
log "all runs done"
echo "$(($(date +%s) - start))" >"$out/elapsed_s"
python3 "$here/scripts/instruct_report.py" "$out" "$report"
