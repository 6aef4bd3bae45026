#!/usr/bin/env bash
# Decode speed of one model, moeforge against llama.cpp (node-llama-cpp), interleaved, at batch 1 and the
# same number of threads (docs/interop.md, "Decode speed"). Usage:
#   scripts/interop/decode_bench.sh MOEFORGE_BIN CHECKPOINT [THREADS] [REPS] [OUT]
# Exports the checkpoint to GGUF in f32, bf16, f16 and q8_0, then each repetition runs, in turn, moeforge
# with its weights in float32 and in bf16 (`generate --dtype`) and llama.cpp on each file. moeforge's decode
# time is measured inside one process (`generate --timing --ignore-eos`: 257 new tokens minus 1, the same
# prompt), over 256 tokens; llama.cpp's is timed inside node over the tokens after the first. Each line is
# also written to OUT/decode.jsonl (default: a temporary folder), and the medians are printed at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=$1 ckpt=$2 threads=${3:-1} reps=${4:-3}
node=$(cat "$here/.cache/node-llama-cpp/node-path")
modules=$here/.cache/node-llama-cpp/node_modules
# Brown ca01's opening as the prompt (64 tokens with <s> in the tokenizer of docs/interop.md's first model).
prompt="The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced no evidence that any irregularities took place. The jury further said in term-end presentments that the"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=${5:-$tmp}
mkdir -p "$out"
: >"$out/decode.jsonl"
gguf_types=(f32 bf16 f16 q8_0)
for t in "${gguf_types[@]}"; do
  "$bin" export --checkpoint "$ckpt" --format gguf --dtype "$t" --out "$tmp/model-$t.gguf" >/dev/null
done
record() {  # ENGINE WEIGHTS REP TOKENS_PER_S
  printf '{"engine": "%s", "weights": "%s", "rep": %d, "threads": %d, "tokens_per_s": %s}\n' "$1" "$2" "$3" \
    "$threads" "$4" >>"$out/decode.jsonl"
  printf '%-9s %-5s rep %d: %s tokens/s\n' "$1" "$2" "$3" "$4"
}
for r in $(seq "$reps"); do
  for d in fp32 bf16; do
    "$bin" --threads "$threads" generate --checkpoint "$ckpt" --dtype "$d" --prompt "$prompt" --temperature 0 \
      --max-tokens 257 --ignore-eos --timing 2>"$tmp/timing.txt" >"$tmp/gen.txt"
    tps=$(python3 -c "import re; print(re.search(r'= ([0-9.]+) tokens/s', open('$tmp/timing.txt').read()).group(1))")
    record moeforge "$d" "$r" "$tps"
  done
  for t in "${gguf_types[@]}"; do
    printf '{"model": "%s", "threads": %d, "bench": {"prompt": "%s", "n_predict": 257, "reps": 1}}' \
      "$tmp/model-$t.gguf" "$threads" "$prompt" >"$tmp/req.json"
    tps=$("$node" "$here/scripts/interop/llamacpp_eval.mjs" "$modules" "$tmp/req.json" |
      python3 -c "import json,sys; d=json.load(sys.stdin); print('%.1f' % d['decode_tokens_per_s'][0])")
    record llama.cpp "$t" "$r" "$tps"
  done
done
python3 "$here/scripts/interop/decode_summary.py" "$out/decode.jsonl"
