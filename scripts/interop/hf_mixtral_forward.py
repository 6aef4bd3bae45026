"""An independent reader of Hugging Face folders (docs/interop.md): the MixtralForCausalLM (and dense
LlamaForCausalLM, and Qwen2MoeForCausalLM) forward written from transformers' modelling definitions
(modeling_mixtral.py, modeling_llama.py, modeling_qwen2_moe.py: RMSNorm, rotate_half RoPE, repeat_kv,
softmax router with top-k weights divided by their sum (Qwen2-MoE: only with norm_topk_prob), experts
w2(silu(w1 x) * w3 x); Qwen2-MoE's q/k/v biases, its sparse layers every decoder_sparse_step, its shared
expert times sigmoid(shared_expert_gate x)), reading only config.json and the safetensors by name. Needs
nothing beyond Debian's python3-torch; computes in float64.

    python3 hf_mixtral_forward.py HF_DIR TOKENS_JSON OUT_JSON

TOKENS_JSON: a JSON list of token ids. OUT_JSON gets {"logits": [[V floats] per position]}.
"""
import json
import os
import struct
import sys

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        t = torch.frombuffer(bytearray(blob[base + a:base + b]), dtype=_DTYPES[e["dtype"]])
        out[name] = t.reshape(e["shape"]).to(torch.float64)
    return out


def load_weights(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w = {}
    for fn in files:
        w.update(read_safetensors(os.path.join(d, fn)))
    return w


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def forward(cfg, w, tokens):
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads", H)
    D = cfg.get("head_dim") or C // H
    qwen = cfg["model_type"] == "qwen2_moe"
    moe = cfg["model_type"] in ("mixtral", "qwen2_moe")
    E = cfg["num_experts"] if qwen else cfg.get("num_local_experts", 0)
    K = cfg.get("num_experts_per_tok", 0)
    norm_topk = cfg.get("norm_topk_prob", False) if qwen else True
    step = cfg.get("decoder_sparse_step", 1) if qwen else 1
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    S = len(tokens)
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]  # [S, C]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(S, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # [S, D]
    causal = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        def proj(name):
            y = h @ w[p + f"self_attn.{name}.weight"].T
            return y + w[p + f"self_attn.{name}.bias"] if qwen else y
        q = proj("q_proj").view(S, H, D).transpose(0, 1)
        k = proj("k_proj").view(S, Hkv, D).transpose(0, 1)
        v = proj("v_proj").view(S, Hkv, D).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(H // Hkv, dim=0)
        v = v.repeat_interleave(H // Hkv, dim=0)
        att = torch.softmax(q @ k.transpose(1, 2) / D ** 0.5 + causal, dim=-1)
        o = (att @ v).transpose(0, 1).reshape(S, H * D)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        def mlp(x_, q_):  # LlamaMLP / Qwen2MoeMLP: down(silu(gate(x)) * up(x))
            return (torch.nn.functional.silu(x_ @ w[q_ + "gate_proj.weight"].T) *
                    (x_ @ w[q_ + "up_proj.weight"].T)) @ w[q_ + "down_proj.weight"].T
        if not moe or (i + 1) % step != 0:
            x = x + mlp(h, p + "mlp.")
            continue
        blk = p + ("mlp." if qwen else "block_sparse_moe.")
        router_logits = h @ w[blk + "gate.weight"].T  # [S, E]
        probs = torch.softmax(router_logits, dim=-1)
        top_w, top_e = torch.topk(probs, K, dim=-1)
        if norm_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(h)
        for e in range(E):
            q_ = f"{blk}experts.{e}."
            rows, slot = torch.where(top_e == e)
            if rows.numel() == 0:
                continue
            he = h[rows]
            if qwen:
                out = mlp(he, q_)
            else:
                out = (torch.nn.functional.silu(he @ w[q_ + "w1.weight"].T) * (he @ w[q_ + "w3.weight"].T)) @ \
                    w[q_ + "w2.weight"].T
            y.index_add_(0, rows, out * top_w[rows, slot].unsqueeze(1))
        if qwen and blk + "shared_expert.gate_proj.weight" in w:
            y = y + torch.sigmoid(h @ w[blk + "shared_expert_gate.weight"].T) * mlp(h, blk + "shared_expert.")
        x = x + y
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def main():
    d, tokens_path, out_path = sys.argv[1:4]
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] in ("mixtral", "llama", "qwen2_moe"), cfg["model_type"]
    with open(tokens_path) as f:
        tokens = json.load(f)
    logits = forward(cfg, load_weights(d), tokens)
    with open(out_path, "w") as f:
        json.dump({"logits": logits.tolist()}, f)


if __name__ == "__main__":
    with torch.no_grad():
        main()
