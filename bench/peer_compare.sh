#!/usr/bin/env bash
# moeforge against its plain-PyTorch peer (bench/pytorch_peer.py) at the default model shape, interleaved in
# rounds so that both see the same machine (docs/performance.md, "End to end"): each round runs
# `moeforge bench --train` (fused and plain-experts steps, and the 2048^3 sgemm, itself interleaved), then
# the peer, with the same threads. Prints each round and the medians over rounds: tokens/s of both, the
# ratio, and moeforge's share of the sgemm measured in the same round. The peer runs twice per round: in
# the environment moeforge sets for itself (OMP_WAIT_POLICY=PASSIVE, src/util/runtime.cpp: "peer") and as a
# user would start it, with OpenMP's default spinning threads ("peer_default"), which on 2 cores fight
# OpenBLAS's own threads.
#
#   bench/peer_compare.sh MOEFORGE_BIN [ROUNDS=3] [STEPS=10] [THREADS=2] [OUT_DIR=runs/peer]
set -euo pipefail
bin=$1
rounds=${2:-3}
steps=${3:-10}
threads=${4:-2}
out=${5:-runs/peer}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  "$bin" --threads "$threads" bench --train --reps "$steps" --json "$out/moeforge-$r.json" >"$out/moeforge-$r.log" 2>&1
  OMP_WAIT_POLICY=PASSIVE /usr/bin/python3 "$here/pytorch_peer.py" --steps "$steps" --threads "$threads" --json "$out/peer-$r.json" \
    >"$out/peer-$r.log" 2>&1
  env -u OMP_WAIT_POLICY /usr/bin/python3 "$here/pytorch_peer.py" --steps "$steps" --threads "$threads" \
    --json "$out/peer_default-$r.json" >"$out/peer_default-$r.log" 2>&1
  /usr/bin/python3 - "$out" "$r" <<'PY'
import json, sys
out, r = sys.argv[1], sys.argv[2]
m = json.load(open(f"{out}/moeforge-{r}.json"))
p = json.load(open(f"{out}/peer-{r}.json"))
d = json.load(open(f"{out}/peer_default-{r}.json"))
f = m["variants"]["fused"]
print(f"round {r}: moeforge {f['tokens_per_s']:.0f} tokens/s ({f['share_of_sgemm']:.3f} of sgemm "
      f"{m['sgemm_gflops']:.1f} GFLOP/s), peer {p['tokens_per_s']:.0f} tokens/s "
      f"({f['tokens_per_s'] / p['tokens_per_s']:.2f}x), peer_default {d['tokens_per_s']:.0f} tokens/s "
      f"({f['tokens_per_s'] / d['tokens_per_s']:.2f}x)")
PY
done
/usr/bin/python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
ms = [json.load(open(f"{out}/moeforge-{r}.json")) for r in range(1, n + 1)]
ps = [json.load(open(f"{out}/peer-{r}.json")) for r in range(1, n + 1)]
ds = [json.load(open(f"{out}/peer_default-{r}.json")) for r in range(1, n + 1)]
dt = [d["tokens_per_s"] for d in ds]
mt = [m["variants"]["fused"]["tokens_per_s"] for m in ms]
pt = [p["tokens_per_s"] for p in ps]
ratio = [a / b for a, b in zip(mt, pt)]
ratio_d = [a / b for a, b in zip(mt, dt)]
share = [m["variants"]["fused"]["share_of_sgemm"] for m in ms]
summary = {"machine": ms[0]["machine"], "rounds": n, "moeforge_tokens_per_s": mt, "peer_tokens_per_s": pt,
           "ratio": ratio, "peer_default_tokens_per_s": dt, "ratio_default": ratio_d, "share_of_sgemm": share, "peer_params": ps[0]["params"],
           "median_ratio": statistics.median(ratio), "median_ratio_default": statistics.median(ratio_d),
           "median_share_of_sgemm": statistics.median(share)}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(f"machine: {summary['machine']}")
print(f"median over {n} rounds: moeforge {statistics.median(mt):.0f} tokens/s, peer {statistics.median(pt):.0f} "
      f"tokens/s, ratio {summary['median_ratio']:.2f}x (range {min(ratio):.2f}-{max(ratio):.2f}); "
      f"against peer_default {statistics.median(dt):.0f} tokens/s: {summary['median_ratio_default']:.2f}x "
      f"(range {min(ratio_d):.2f}-{max(ratio_d):.2f}); moeforge at {summary['median_share_of_sgemm']:.3f} of the sgemm")
PY
