"""PyTorch reference of moeforge's decoder-only MoE transformer (src/model/transformer.cpp): token embedding,
RMSNorm, rotary embedding (half-split pairs), causal multi-head attention, an MoE FFN (top-K softmax,
renormalised gates, SwiGLU experts, Switch balance + z-loss) every `moe_every` layers and dense SwiGLU FFNs
elsewhere, tied output head. Writes parameters (named as in the C++ model), tokens, logits, loss and every
gradient, in float64."""
import math

import torch
import torch.nn.functional as F

from moe_block import balance_loss, moe_block, z_loss
from safetensors_io import save


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attention(x, w_qkv, w_out, n_head, cos, sin):
    B, S, C = x.shape
    D = C // n_head
    qkv = (x @ w_qkv.t()).view(B, S, 3, n_head, D)
    q = rope(qkv[:, :, 0].transpose(1, 2), cos, sin)
    k = rope(qkv[:, :, 1].transpose(1, 2), cos, sin)
    v = qkv[:, :, 2].transpose(1, 2)
    att = (q @ k.transpose(2, 3)) / math.sqrt(D)
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)
    att = att.masked_fill(mask, float("-inf"))
    y = torch.softmax(att, -1) @ v
    return y.transpose(1, 2).reshape(B, S, C) @ w_out.t()


def write(out_dir):
    g = torch.Generator().manual_seed(11)
    d = torch.float64
    V, C, H, L, Fd, E, K, Fe, S, B = 37, 16, 2, 3, 24, 4, 2, 12, 7, 2
    moe_every, eps, theta, alpha, beta = 2, 1e-5, 10000.0, 1e-2, 1e-3
    p = {"embedding": torch.randn(V, C, generator=g, dtype=d) * 0.3}
    for i in range(L):
        pre = f"blocks.{i}."
        p[pre + "attn_norm.weight"] = 1 + 0.1 * torch.randn(C, generator=g, dtype=d)
        p[pre + "attn.w_qkv"] = torch.randn(3 * C, C, generator=g, dtype=d) / C ** 0.5
        p[pre + "attn.w_out"] = torch.randn(C, C, generator=g, dtype=d) / C ** 0.5
        p[pre + "ffn_norm.weight"] = 1 + 0.1 * torch.randn(C, generator=g, dtype=d)
        if (i + 1) % moe_every == 0:
            p[pre + "moe.router.weight"] = torch.randn(E, C, generator=g, dtype=d) * 0.5
            p[pre + "moe.experts.w_gate"] = torch.randn(E, Fe, C, generator=g, dtype=d) / C ** 0.5
            p[pre + "moe.experts.w_up"] = torch.randn(E, Fe, C, generator=g, dtype=d) / C ** 0.5
            p[pre + "moe.experts.w_down"] = torch.randn(E, C, Fe, generator=g, dtype=d) / Fe ** 0.5
        else:
            p[pre + "ffn.w_gate"] = torch.randn(Fd, C, generator=g, dtype=d) / C ** 0.5
            p[pre + "ffn.w_up"] = torch.randn(Fd, C, generator=g, dtype=d) / C ** 0.5
            p[pre + "ffn.w_down"] = torch.randn(C, Fd, generator=g, dtype=d) / Fd ** 0.5
    p["final_norm.weight"] = 1 + 0.1 * torch.randn(C, generator=g, dtype=d)
    for t in p.values():
        t.requires_grad_()
    tokens = torch.randint(0, V, (B, S + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    Dh = C // H
    inv_freq = theta ** (-torch.arange(0, Dh, 2, dtype=d) / Dh)
    ang = torch.outer(torch.arange(S, dtype=d), inv_freq)
    cos, sin = ang.cos(), ang.sin()
    x = p["embedding"][inputs]
    aux = torch.zeros((), dtype=d)
    for i in range(L):
        pre = f"blocks.{i}."
        x = x + attention(rms_norm(x, p[pre + "attn_norm.weight"], eps), p[pre + "attn.w_qkv"],
                          p[pre + "attn.w_out"], H, cos, sin)
        h = rms_norm(x, p[pre + "ffn_norm.weight"], eps)
        if (i + 1) % moe_every == 0:
            y, logits, probs, top_i = moe_block(h.reshape(B * S, C), p[pre + "moe.router.weight"],
                                                p[pre + "moe.experts.w_gate"], p[pre + "moe.experts.w_up"],
                                                p[pre + "moe.experts.w_down"], K, "softmax", True)
            aux = aux + alpha * balance_loss(probs, top_i, 1) + beta * z_loss(logits)
            x = x + y.view(B, S, C)
        else:
            x = x + (F.silu(h @ p[pre + "ffn.w_gate"].t()) * (h @ p[pre + "ffn.w_up"].t())) @ p[pre + "ffn.w_down"].t()
    x = rms_norm(x, p["final_norm.weight"], eps)
    logits = x @ p["embedding"].t()
    ce = F.cross_entropy(logits.reshape(B * S, V), targets.reshape(-1))
    loss = ce + aux
    loss.backward()
    out = {"tokens": tokens, "logits": logits, "ce": ce, "aux_loss": aux}
    for n, t in p.items():
        out["param." + n] = t
        out["grad." + n] = t.grad
    save(f"{out_dir}/transformer.safetensors", out,
         dict(V=V, C=C, H=H, L=L, d_ff=Fd, E=E, K=K, d_expert=Fe, S=S, B=B, moe_every=moe_every, norm_eps=eps,
              rope_theta=theta, balance_coef=alpha, z_loss_coef=beta))
