#!/usr/bin/env bash
# Writes the fuzz seed corpora (fuzz/corpus/TARGET/) from real files moeforge writes: a checkpoint of a
# tiny run of the built CLI, its safetensors files, config and tokenizer, and configs/*.toml
# (docs/reliability.md). Usage: scripts/fuzz-seeds.sh [BUILD]  (default build/)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$here/build}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/corpus/animals" "$tmp/corpus/tools"
for f in 0 1 2 3; do
  for i in $(seq 1 40); do echo -n "the cat sees the dog $f. the bird likes the fox. "; done >"$tmp/corpus/animals/d$f.txt"
  for i in $(seq 1 40); do echo -n "the saw cuts the wood $f. the drill turns. "; done >"$tmp/corpus/tools/d$f.txt"
done
"$build/moeforge" train --out "$tmp/run" --no-report \
  --set model.d_model=8 --set model.n_layer=1 --set model.n_head=1 --set model.d_ff=8 \
  --set moe.n_expert=4 --set moe.d_expert=4 --set moe.n_expert_used=1 --set train.steps=2 --set train.batch_size=2 \
  --set train.eval_every=0 --set train.eval_batches=1 --set train.threads=1 \
  --set data.corpus="\"text:$tmp/corpus\"" --set data.dir="\"$tmp/data\"" --set data.vocab_size=100 \
  --set data.seq_len=8 --set data.validation_fraction=0.25 --set 'data.heldout_genres=[]' >/dev/null
ckpt="$tmp/run/checkpoints/step-000002"
c="$here/fuzz/corpus"
mkdir -p "$c/safetensors" "$c/checkpoint" "$c/config" "$c/tokenizer"
for f in model trainer optimizer; do cp "$ckpt/$f.safetensors" "$c/safetensors/$f.safetensors"; done
cp "$ckpt/tokenizer.model" "$c/tokenizer/tiny.model"
cp "$ckpt/config.toml" "$c/config/checkpoint.toml"
for f in "$here"/configs/*.toml; do cp "$f" "$c/config/$(basename "$f")"; done
printf 'train.steps=7\nmoe.router="topk"\n\n' | cat - "$ckpt/config.toml" >"$c/config/with-set.txt"
sep=$'\n--moeforge-fuzz-file--\n'
join() {
  local out=$1
  shift
  : >"$out"
  local first=1
  for f in "$@"; do
    [ $first = 1 ] || printf '%s' "$sep" >>"$out"
    cat "$f" >>"$out"
    first=0
  done
}
parts=("$ckpt/manifest.json" "$ckpt/model.safetensors" "$ckpt/trainer.safetensors" "$ckpt/config.toml"
  "$ckpt/tokenizer.model")
join "$c/checkpoint/as-written" "${parts[@]}"
{ printf '!'; cat "$c/checkpoint/as-written"; } >"$c/checkpoint/fixed-sums"
join "$c/checkpoint/with-optimizer" "${parts[@]}" "$ckpt/optimizer.safetensors"
# fuzz_hf: the Hugging Face folder `moeforge export --format hf` writes of the same checkpoint, alone and
# with a shard index naming its one file.
"$build/moeforge" export --checkpoint "$ckpt" --format hf --out "$tmp/hf" >/dev/null
mkdir -p "$c/hf"
hf=("$tmp/hf/config.json" "$tmp/hf/tokenizer.model" "$tmp/hf/model.safetensors")
join "$c/hf/mixtral" "${hf[@]}"
printf '{"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}\n' >"$tmp/index.json"
join "$c/hf/mixtral-with-index" "${hf[@]}" "$tmp/index.json"
ls -l "$c"/*
