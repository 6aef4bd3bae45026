#!/usr/bin/env bash
# The load measurement of docs/serve.md ("Load"): `moeforge serve` on the default model (make run's
# runs/default), N concurrent clients for D seconds on loopback (scripts/serve-load.cjs), then SIGTERM.
# Prints the machine, the OpenBLAS core, the commit and the figures (JSON). Bounded: the server listens on
# 127.0.0.1 only, the clients stop after D seconds (each request has a time limit), and the whole run is
# killed D + 300 seconds after it starts whatever happens.
#   scripts/serve-load.sh [MOEFORGE=build/moeforge] [CHECKPOINT=runs/default/checkpoints] [CLIENTS=8]
#                         [DURATION=60] [MAX_TOKENS=32] [STREAM=0]       (environment variables)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
moeforge=${MOEFORGE:-$here/build/moeforge}
checkpoint=${CHECKPOINT:-$here/runs/default/checkpoints}
clients=${CLIENTS:-8}
seconds=${DURATION:-60}
max_tokens=${MAX_TOKENS:-32}
stream=${STREAM:-0}
node=${NODE:-node}
log=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$log"' EXIT
"$moeforge" serve --checkpoint "$checkpoint" --port 0 --queue "$clients" >"$log/out" 2>"$log/err" &
pid=$!
for _ in $(seq 600); do
  grep -q 'on http://' "$log/out" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$log/err" >&2; exit 1; }
  sleep 0.1
done
url=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log/out" | head -n1 || true)
[ -n "$url" ] || { echo "serve-load: the server did not start on 127.0.0.1 in 60 s" >&2; cat "$log/err" >&2; exit 1; }
cpu() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'; }
echo "machine: $(cpu 'model name') (family $(cpu 'cpu family') model $(cpu 'model')), $(nproc) cores;" \
  "$("$moeforge" info 2>/dev/null | grep -m1 '^openblas core' || echo 'openblas core: ?');" \
  "commit $(git -C "$here" rev-parse --short HEAD)$(git -C "$here" diff --quiet HEAD || echo '+changes')"
echo "$(head -n1 "$log/out")"
CLK_TCK=$(getconf CLK_TCK) timeout --signal=TERM --kill-after=10 $((seconds + 300)) \
  "$node" "$here/scripts/serve-load.cjs" "$url" "$pid" "$clients" "$seconds" "$max_tokens" "$stream"
# SIGTERM: the server finishes what is in flight (nothing, by now) and exits; killed if it has not in 120 s.
kill -TERM "$pid"
for _ in $(seq 1200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && { echo "serve-load: no exit 120 s after SIGTERM; killed" >&2; kill -KILL "$pid"; }
rc=0
wait "$pid" || rc=$?
pid=
echo "server: $(tail -n1 "$log/out") (exit $rc)"
