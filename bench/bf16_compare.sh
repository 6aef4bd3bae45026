#!/usr/bin/env bash
# bf16 training against float32 and against plain PyTorch (docs/performance.md, "bf16 training: speed"):
# each round runs `moeforge bench --train` at SHAPE (its fused float32, plain and bf16 steps and the sgemm
# and bf16 GEMMs, interleaved), then bench/pytorch_peer.py at the same shape in float32 and with
# torch.autocast bf16, all in the thread environment moeforge sets for itself (OMP_WAIT_POLICY=PASSIVE).
# Prints each round and the medians over rounds, against the goals of docs/performance.md.
#
#   bench/bf16_compare.sh MOEFORGE_BIN [SHAPE=wide|default] [ROUNDS=3] [STEPS=5] [THREADS=2] [OUT_DIR]
set -euo pipefail
bin=$1
shape=${2:-wide}
rounds=${3:-3}
steps=${4:-5}
threads=${5:-2}
out=${6:-runs/bf16-$shape}
here=$(cd "$(dirname "$0")" && pwd)
case "$shape" in
  wide) sets=(--set model.d_model=512 --set model.n_head=8 --set model.d_ff=1376 --set moe.d_expert=688
              --set 'moe.router="topk"') ;;
  default) sets=(--set 'moe.router="topk"') ;;  # the peer's flat top-2 router (pytorch_peer.py)
  *) echo "bf16_compare: SHAPE must be wide or default, got '$shape'" >&2; exit 2 ;;
esac
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  "$bin" --threads "$threads" bench --train --reps "$steps" "${sets[@]}" --json "$out/moeforge-$r.json" \
    >"$out/moeforge-$r.log" 2>&1
  for ac in none bf16; do
    OMP_WAIT_POLICY=PASSIVE /usr/bin/python3 "$here/pytorch_peer.py" --steps "$steps" --threads "$threads" \
      --shape "$shape" --autocast "$ac" --json "$out/peer-$ac-$r.json" >"$out/peer-$ac-$r.log" 2>&1
  done
  echo "round $r done"
done
/usr/bin/python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
med = statistics.median
ms = [json.load(open(f"{out}/moeforge-{r}.json")) for r in range(1, n + 1)]
p32 = [json.load(open(f"{out}/peer-none-{r}.json"))["tokens_per_s"] for r in range(1, n + 1)]
p16 = [json.load(open(f"{out}/peer-bf16-{r}.json"))["tokens_per_s"] for r in range(1, n + 1)]
m32 = [m["variants"]["fused"]["tokens_per_s"] for m in ms]
m16 = [m["variants"]["bf16"]["tokens_per_s"] for m in ms]
share16 = [m["variants"]["bf16"]["share_of_own_gemm"] for m in ms]
share32 = [m["variants"]["fused"]["share_of_own_gemm"] for m in ms]
flips = ms[-1].get("route_flips_bf16")
r = lambda a, b: [x / y for x, y in zip(a, b)]
s = {"machine": ms[0]["machine"], "rounds": n, "moeforge_fp32": m32, "moeforge_bf16": m16, "peer_fp32": p32,
     "peer_autocast_bf16": p16, "bf16_over_fp32": r(m16, m32), "bf16_over_peer_autocast": r(m16, p16),
     "best_over_best_peer": r([max(a, b) for a, b in zip(m32, m16)], [max(a, b) for a, b in zip(p32, p16)]),
     "share_of_bf16_gemm": share16, "fp32_share_of_sgemm": share32,
     "sgemm_gflops": [m["sgemm_gflops"] for m in ms], "bf16_gemm_gflops": [m["bf16_gemm_gflops"] for m in ms],
     "route_flips_bf16": flips}
json.dump(s, open(f"{out}/summary.json", "w"), indent=1)
rng = lambda v: f"{med(v):.2f} ({min(v):.2f}-{max(v):.2f})"
print(f"machine: {s['machine']}")
print(f"tokens/s, median of {n} rounds: moeforge fp32 {med(m32):.0f}, bf16 {med(m16):.0f}; "
      f"PyTorch fp32 {med(p32):.0f}, autocast bf16 {med(p16):.0f}")
print(f"bf16 / fp32 {rng(s['bf16_over_fp32'])}; bf16 / PyTorch autocast {rng(s['bf16_over_peer_autocast'])}; "
      f"faster moeforge / faster PyTorch {rng(s['best_over_best_peer'])}")
print(f"bf16 share of the bf16 GEMM {rng(share16)}; fp32 share of the sgemm {rng(share32)}; routing flips {flips}")
PY
