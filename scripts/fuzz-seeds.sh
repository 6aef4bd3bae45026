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
  --set data.corpus="\"text:$tmp/corpus\"" --set data.dir="\"$tmp/data\"" --set data.vocab_size=100 --set data.byte_fallback=false \
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
# A Qwen2-MoE folder (the reader's qwen2_moe path) made from the same export: experts renamed, zero q/k/v
# biases, a shared expert and its gate added, in the config and the weights.
/usr/bin/python3 - "$tmp/hf" "$tmp/qwen" <<'PY'
import json, os, shutil, struct, sys
import torch
src, dst = sys.argv[1:3]
os.makedirs(dst, exist_ok=True)
shutil.copy(os.path.join(src, "tokenizer.model"), dst)
cfg = json.load(open(os.path.join(src, "config.json")))
blob = open(os.path.join(src, "model.safetensors"), "rb").read()
n = struct.unpack("<Q", blob[:8])[0]
head = json.loads(blob[8:8 + n])
t = {}
for k, e in head.items():
    if k == "__metadata__":
        continue
    a, b = e["data_offsets"]
    t[k] = torch.frombuffer(bytearray(blob[8 + n + a:8 + n + b]), dtype=torch.float32).reshape(e["shape"])
out = {}
F, C = cfg["intermediate_size"], cfg["hidden_size"]
for k, v in t.items():
    k2 = k.replace("block_sparse_moe.", "mlp.").replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.")
    out[k2.replace(".w2.", ".down_proj.")] = v
for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    for x in "qkv":
        out[p + f"self_attn.{x}_proj.bias"] = torch.zeros(out[p + f"self_attn.{x}_proj.weight"].shape[0])
    out[p + "mlp.shared_expert.gate_proj.weight"] = torch.zeros(F, C)
    out[p + "mlp.shared_expert.up_proj.weight"] = torch.zeros(F, C)
    out[p + "mlp.shared_expert.down_proj.weight"] = torch.zeros(C, F)
    out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, C)
cfg.update({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_experts": cfg.pop("num_local_experts"),
            "moe_intermediate_size": F, "shared_expert_intermediate_size": F, "norm_topk_prob": cfg["num_experts_per_tok"] > 1,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False})
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=1)
header, off, data = {}, 0, b""
for k, v in out.items():
    b = v.contiguous().numpy().tobytes()
    header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
    off += len(b)
    data += b
h = json.dumps(header).encode()
h += b" " * ((8 - len(h) % 8) % 8)
open(os.path.join(dst, "model.safetensors"), "wb").write(struct.pack("<Q", len(h)) + h + data)
PY
join "$c/hf/qwen2-moe" "$tmp/qwen/config.json" "$tmp/qwen/tokenizer.model" "$tmp/qwen/model.safetensors"
ls -l "$c"/*
