#!/usr/bin/env bash
# The measurements of docs/data.md ("Your own corpus", "Measured"): tokenize throughput against
# SentencePiece's own spm_encode on the same text, a >= 2 GB JSON-lines corpus tokenized in bounded memory,
# and the default model trained on its shards against the same model on Brown's shards (peak RSS from
# /usr/bin/time -v, tokens/s from metrics.jsonl). Writes under WORK (default /tmp/moeforge-shards-measure);
# needs ~5 GB there. Prints one line per figure.
#   scripts/shards-measure.sh  (environment: WORK, GB=2.1, STEPS=300, SLICE_MB=200, EVAL_BATCHES=50,
#                               ONLY_TRAIN=1 to reuse WORK's shard folders and measure the training only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
moeforge=${MOEFORGE:-$here/build/moeforge}
work=${WORK:-/tmp/moeforge-shards-measure}
gb=${GB:-2.1}
steps=${STEPS:-300}
slice_mb=${SLICE_MB:-200}
eval_batches=${EVAL_BATCHES:-50}  # the default config evaluates the whole validation split: 250k windows here
mkdir -p "$work"
cd "$here"  # data.dir = "data" (Brown) is relative to the repository

command -v spm_encode >/dev/null || { echo "shards-measure: spm_encode missing (apt-get install sentencepiece)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "shards-measure: /usr/bin/time missing (apt-get install time)" >&2; exit 1; }

peak_mb() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$1"; }
wall_s() {
  awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; ++i) s = s * 60 + p[i]; printf "%.1f", s}' "$1"
}

"$moeforge" info 2>/dev/null | head -n1
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')"

if [ "${ONLY_TRAIN:-0}" != 1 ]; then
# The corpus (scripts/make-big-jsonl.py: Brown sentences and WordNet glosses) and Brown's shards.
big=$work/big.jsonl
[ -f "$big" ] || /usr/bin/python3 scripts/make-big-jsonl.py --out "$big" --gb "$gb"
rm -rf "$work/brown-shards"
"$moeforge" tokenize --corpus brown --out "$work/brown-shards" --no-progress >/dev/null

# Throughput on the first SLICE_MB MB: moeforge tokenize with Brown's tokenizer (one pass: read, parse,
# encode, write) on 1 and 2 threads, against spm_encode (one thread) on the same documents' texts, one per line.
slice=$work/slice.jsonl
head -c "$((slice_mb * 1000000))" "$big" | sed '$d' >"$slice"
/usr/bin/python3 -c '
import json, sys
with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[2], "w", encoding="utf-8") as out:
    for line in f:
        out.write(json.loads(line)["text"].replace("\n", " ") + "\n")
' "$slice" "$work/slice.txt"
text_mb=$(stat -c %s "$work/slice.txt" | awk '{printf "%.1f", $1 / 1e6}')
json_mb=$(stat -c %s "$slice" | awk '{printf "%.1f", $1 / 1e6}')
for t in 1 2; do
  rm -rf "$work/slice-shards"
  /usr/bin/time -v -o "$work/time-slice-$t" "$moeforge" --threads "$t" tokenize --corpus "jsonl:$slice" \
    --out "$work/slice-shards" --tokenizer "$work/brown-shards" --no-progress >/dev/null
  s=$(wall_s "$work/time-slice-$t")
  echo "tokenize, $t thread(s): $json_mb MB of JSON lines ($text_mb MB of text) in $s s =" \
    "$(awk -v a="$text_mb" -v b="$s" 'BEGIN {printf "%.1f", a / b}') MB/s of text; peak RSS $(peak_mb "$work/time-slice-$t") MB"
done
/usr/bin/time -v -o "$work/time-spm" spm_encode --model "$work/brown-shards/tokenizer.model" --output_format=id \
  <"$work/slice.txt" >"$work/slice.ids"
s=$(wall_s "$work/time-spm")
echo "spm_encode (1 thread): $text_mb MB of text in $s s = $(awk -v a="$text_mb" -v b="$s" 'BEGIN {printf "%.1f", a / b}') MB/s;" \
  "peak RSS $(peak_mb "$work/time-spm") MB"
rm -f "$work/slice.ids" "$work/slice.txt"

# The whole corpus, its own tokenizer trained on the default 64 MB sample.
rm -rf "$work/big-shards"
/usr/bin/time -v -o "$work/time-big" "$moeforge" tokenize --corpus "jsonl:$big" --out "$work/big-shards" \
  --set 'data.heldout_genres=["humor"]' --no-progress | tail -n 2
echo "tokenize $(stat -c %s "$big" | awk '{printf "%.2f GB", $1 / 1e9}'): $(wall_s "$work/time-big") s," \
  "peak RSS $(peak_mb "$work/time-big") MB; shards $(du -sm "$work/big-shards" | cut -f1) MB"

fi

# The default model on each: same steps, same everything but the data.
for name in brown big; do
  rm -rf "$work/run-$name"
  /usr/bin/time -v -o "$work/time-train-$name" "$moeforge" train --set "data.corpus=\"shards:$work/$name-shards\"" \
    --set "train.steps=$steps" --set "train.eval_batches=$eval_batches" --out "$work/run-$name" --no-report >"$work/train-$name.log" 2>&1
  tps=$(/usr/bin/python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
t = [r["tokens_per_s"] for r in rows if r.get("split") == "train" and r["step"] > 50]
print(f"{sum(t) / len(t):.0f}")
' "$work/run-$name/metrics.jsonl")
  echo "train on $name shards, $steps steps: peak RSS $(peak_mb "$work/time-train-$name") MB," \
    "$tps tokens/s (mean of the logged steps after 50), wall $(wall_s "$work/time-train-$name") s;" \
    "$(grep -m1 '^data:' "$work/train-$name.log")"
done
