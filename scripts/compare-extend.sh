#!/usr/bin/env bash
# The committed router comparison (docs/results/), extended without retraining what it already holds:
# every call passes --reuse with the committed compare.json, so each (variant, seed) it has with today's
# config (keys added to moeforge since aside; docs/comparison.md, "Extending a comparison") is taken as it
# is, and only the new ones train. The calls go in order of what the report needs most, so that a stop
# part-way leaves whole variants; the last call measures throughput and writes the report.
#
#   scripts/compare-extend.sh [BINARY] [OUT]     (defaults: build/moeforge, runs/results)
#   then: cp OUT/compare.json docs/results/ && BINARY compare --render-only --out docs/results
set -euo pipefail
bin=${1:-build/moeforge}
out=${2:-runs/results}
earlier=$(mktemp /tmp/moeforge-compare-earlier.XXXXXX.json)
# The comparison committed before this extension.
git show 477001c:docs/results/compare.json > "$earlier"
call() { "$bin" compare --config configs/compare.toml --out "$out" --reuse "$earlier" "$@"; }
call --no-bench --variants top2-switch,top2-noloss,loss-free,bip,ec-causal,ec-noncausal,hierarchical,moce
call --no-bench --variants dense-active,dense-total,moce-2x8,moce-per-layer,ec-causal-rerun
call --no-bench --variants moce-gate,moce-general
call --no-bench --variants top2-cap1.25
call --no-bench --variants fault-free-300,fault-x100-rel,fault-x100-norel,fault-nan-rel,fault-nan-norel
call
