#!/usr/bin/env bash
# Decode speed of one exported model, moeforge against llama.cpp (node-llama-cpp), interleaved, at batch 1
# and the same number of threads (docs/interop.md). Usage:
#   scripts/interop/decode_bench.sh MOEFORGE_BIN CHECKPOINT GGUF [THREADS] [REPS]
# moeforge's decode time is measured inside one process (`generate --timing --ignore-eos`: 257 new tokens
# minus 1, the same prompt), over 256 tokens; llama.cpp's is timed inside node over the tokens after the first.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=$1 ckpt=$2 gguf=$3 threads=${4:-1} reps=${5:-3}
node=$(cat "$here/.cache/node-llama-cpp/node-path")
modules=$here/.cache/node-llama-cpp/node_modules
# A 64-token prompt (Brown ca01's opening, with <s>: counted by llama.cpp's tokenizer below).
prompt="The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced no evidence that any irregularities took place. The jury further said in term-end presentments that the"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for r in $(seq "$reps"); do
  "$bin" --threads "$threads" generate --checkpoint "$ckpt" --prompt "$prompt" --temperature 0 --max-tokens 257 \
    --ignore-eos --timing 2>"$tmp/timing.txt" >"$tmp/gen.txt"
  python3 -c "import re; t = open('$tmp/timing.txt').read(); print('moeforge  rep $r: %s tokens/s (%s)' % (re.search(r'= ([0-9.]+) tokens/s', t).group(1), t.strip()))"
  printf '{"model": "%s", "threads": %d, "bench": {"prompt": "%s", "n_predict": 257, "reps": 1}}' \
    "$gguf" "$threads" "$prompt" >"$tmp/req.json"
  "$node" "$here/scripts/interop/llamacpp_eval.mjs" "$modules" "$tmp/req.json" |
    python3 -c "import json,sys; d=json.load(sys.stdin); print('llama.cpp rep $r: %.1f tokens/s (prompt %d tokens)' % (d['decode_tokens_per_s'][0], d['bench_prompt_tokens']))"
done
