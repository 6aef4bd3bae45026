#!/usr/bin/env bash
# Runs each built libFuzzer target for SECONDS (docs/reliability.md):
#   scripts/fuzz.sh BUILD SECONDS TARGET...
# Inputs: fuzz/corpus/TARGET (seeds from real files moeforge writes) and fuzz/regressions/TARGET (past
# findings), both read-only; new coverage goes to BUILD/fuzz-corpus/TARGET, crashes to BUILD/findings/.
# Prints executions per target; exits non-zero on the first finding.
set -euo pipefail
build=$1
seconds=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$build/findings"
# The checkpoint and Hugging Face targets write each input as a folder of files: in memory they run several
# times faster than on disk (fuzz_checkpoint here: ~740/s on disk, ~2,960/s in /dev/shm).
if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
for t in "$@"; do
  mkdir -p "$build/fuzz-corpus/$t" "$here/fuzz/regressions/$t"
  log="$build/fuzz-$t.log"
  echo "fuzz: $t for ${seconds}s (log $log)"
  # Leak checks stay on for moeforge's code; LibTorch's and SentencePiece's one-time allocations at exit
  # are not per-input leaks, which is all libFuzzer reports.
  # A tokenizer model (and so a checkpoint) holds SentencePiece's ~230 kB normaliser table.
  max_len=65536
  case $t in checkpoint | tokenizer | hf) max_len=400000 ;; esac
  status=0
  ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
    "$build/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=$max_len \
    -print_final_stats=1 -artifact_prefix="$build/findings/$t-" \
    "$build/fuzz-corpus/$t" "$here/fuzz/corpus/$t" "$here/fuzz/regressions/$t" >"$log" 2>&1 || status=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  echo "fuzz: $t: $execs executions, exit $status"
  if [ "$status" != 0 ]; then
    tail -40 "$log"
    exit "$status"
  fi
done
