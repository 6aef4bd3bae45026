"""PyTorch reference of ten training steps of moeforge's MoE transformer (as llm.c's test_gpt2 checks a
few steps of training): the model of transformer.py, the cross-entropy plus the routers' aux losses,
moeforge's global-norm clipping (src/train/optim.cpp: scale = max / (norm + 1e-6)), its AdamW (decoupled
decay on matrices only, bias-corrected moments, eps outside the square root) and warm-up + cosine learning
rate, and the routers' state updates after each step. Two routers:
  topk      top-2 softmax, renormalised gates, Switch balance + z-loss (docs/routing.md sections 1, 8);
  loss_free selection on s + b, gates from s renormalised, z-loss only, after each step
            b += u * sign(mean(c) - c) from the step's load c (docs/routing.md section 3).
Writes the initial parameters, the token batches, every step's loss and the final parameters and biases,
in float64."""
import math

import torch
import torch.nn.functional as F

from moe_block import balance_loss, z_loss
from safetensors_io import save
from transformer import attention, rms_norm

V, C, H, L, Fd, E, K, Fe, S, B = 37, 16, 2, 2, 24, 4, 2, 12, 6, 3
MOE_EVERY, EPS, THETA = 1, 1e-5, 10000.0
ALPHA, BETA, U = 1e-2, 1e-3, 1e-2
STEPS, LR, WARMUP, MIN_LR_RATIO, WD, BETA1, BETA2, ADAM_EPS, CLIP = 10, 3e-2, 2, 0.1, 0.1, 0.9, 0.95, 1e-8, 1.0


def moe_ffn(x, w_router, w_gate, w_up, w_down, bias):
    """Top-K of softmax(z) + bias (bias None: plain top-K); gates from s renormalised over the K chosen."""
    logits = x @ w_router.t()
    s = torch.softmax(logits, dim=1)
    sel = s.detach() if bias is None else s.detach() + bias
    top_i = sel.topk(K, dim=1).indices
    top_v = s.gather(1, top_i)
    gates = top_v / top_v.sum(1, keepdim=True)
    y = torch.zeros_like(x)
    load = torch.zeros(E, dtype=torch.int64)
    for e in range(E):
        tok, rank = (top_i == e).nonzero(as_tuple=True)
        load[e] = tok.numel()
        if tok.numel() == 0:
            continue
        xs = x[tok]
        h = F.silu(xs @ w_gate[e].t()) * (xs @ w_up[e].t())
        y = y.index_add(0, tok, (h @ w_down[e].t()) * gates[tok, rank].unsqueeze(1))
    return y, logits, s, top_i, load


def learning_rate(step):
    if WARMUP > 0 and step < WARMUP:
        return LR * (step + 1) / WARMUP
    span = max(1, STEPS - WARMUP)
    progress = min(1.0, (step - WARMUP) / span)
    min_lr = LR * MIN_LR_RATIO
    return min_lr + 0.5 * (LR - min_lr) * (1 + math.cos(math.pi * progress))


def init_params(g, d):
    p = {"embedding": torch.randn(V, C, generator=g, dtype=d) * 0.3}
    for i in range(L):
        pre = f"blocks.{i}."
        p[pre + "attn_norm.weight"] = 1 + 0.1 * torch.randn(C, generator=g, dtype=d)
        p[pre + "attn.w_qkv"] = torch.randn(3 * C, C, generator=g, dtype=d) / C ** 0.5
        p[pre + "attn.w_out"] = torch.randn(C, C, generator=g, dtype=d) / C ** 0.5
        p[pre + "ffn_norm.weight"] = 1 + 0.1 * torch.randn(C, generator=g, dtype=d)
        p[pre + "moe.router.weight"] = torch.randn(E, C, generator=g, dtype=d) * 0.5
        p[pre + "moe.experts.w_gate"] = torch.randn(E, Fe, C, generator=g, dtype=d) / C ** 0.5
        p[pre + "moe.experts.w_up"] = torch.randn(E, Fe, C, generator=g, dtype=d) / C ** 0.5
        p[pre + "moe.experts.w_down"] = torch.randn(E, C, Fe, generator=g, dtype=d) / Fe ** 0.5
    p["final_norm.weight"] = 1 + 0.1 * torch.randn(C, generator=g, dtype=d)
    return p


def run(router, out_dir):
    g = torch.Generator().manual_seed(23)
    d = torch.float64
    p = init_params(g, d)
    init = {n: t.clone() for n, t in p.items()}
    for t in p.values():
        t.requires_grad_()
    batches = torch.randint(0, V, (STEPS, B, S + 1), generator=g)
    bias = [torch.zeros(E, dtype=d) for _ in range(L)] if router == "loss_free" else None
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    Dh = C // H
    inv_freq = THETA ** (-torch.arange(0, Dh, 2, dtype=d) / Dh)
    ang = torch.outer(torch.arange(S, dtype=d), inv_freq)
    cos, sin = ang.cos(), ang.sin()
    losses = []
    for step in range(STEPS):
        tokens = batches[step]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        x = p["embedding"][inputs]
        aux = torch.zeros((), dtype=d)
        loads = []
        for i in range(L):
            pre = f"blocks.{i}."
            x = x + attention(rms_norm(x, p[pre + "attn_norm.weight"], EPS), p[pre + "attn.w_qkv"],
                              p[pre + "attn.w_out"], H, cos, sin)
            h = rms_norm(x, p[pre + "ffn_norm.weight"], EPS)
            y, logits, probs, top_i, load = moe_ffn(h.reshape(B * S, C), p[pre + "moe.router.weight"],
                                                    p[pre + "moe.experts.w_gate"], p[pre + "moe.experts.w_up"],
                                                    p[pre + "moe.experts.w_down"],
                                                    None if bias is None else bias[i])
            if router == "topk":
                aux = aux + ALPHA * balance_loss(probs, top_i, 1)
            aux = aux + BETA * z_loss(logits)
            loads.append(load)
            x = x + y.view(B, S, C)
        x = rms_norm(x, p["final_norm.weight"], EPS)
        logits = x @ p["embedding"].t()
        ce = F.cross_entropy(logits.reshape(B * S, V), targets.reshape(-1))
        loss = ce + aux
        for t in p.values():
            t.grad = None
        loss.backward()
        losses.append(ce.item())
        with torch.no_grad():
            norm = math.sqrt(sum(t.grad.pow(2).sum().item() for t in p.values()))
            if CLIP > 0 and norm > CLIP:
                for t in p.values():
                    t.grad.mul_(CLIP / (norm + 1e-6))
            lr = learning_rate(step)
            bc1, bc2 = 1 - BETA1 ** (step + 1), 1 - BETA2 ** (step + 1)
            for n, t in p.items():
                if t.dim() >= 2 and WD > 0:
                    t.mul_(1 - lr * WD)
                m[n].mul_(BETA1).add_(t.grad, alpha=1 - BETA1)
                v[n].mul_(BETA2).addcmul_(t.grad, t.grad, value=1 - BETA2)
                t.addcdiv_(m[n], (v[n] / bc2).sqrt().add_(ADAM_EPS), value=-lr / bc1)
            if bias is not None:
                for i in range(L):
                    c = loads[i].to(d)
                    bias[i] += U * torch.sign(c.mean() - c)
    out = {"batches": batches, "losses": torch.tensor(losses, dtype=d)}
    for n, t in init.items():
        out["init." + n] = t
    for n, t in p.items():
        out["final." + n] = t.detach()
    if bias is not None:
        for i in range(L):
            out[f"final.blocks.{i}.moe.router.bias"] = bias[i]
    save(f"{out_dir}/train_steps_{router}.safetensors", out,
         dict(V=V, C=C, H=H, L=L, E=E, K=K, d_expert=Fe, S=S, B=B, norm_eps=EPS, rope_theta=THETA,
              balance_coef=ALPHA if router == "topk" else 0.0, z_loss_coef=BETA, bias_update_rate=U, steps=STEPS,
              lr=LR, warmup=WARMUP, min_lr_ratio=MIN_LR_RATIO, weight_decay=WD, beta1=BETA1, beta2=BETA2,
              adam_eps=ADAM_EPS, grad_clip=CLIP))


def write(out_dir):
    for router in ("topk", "loss_free"):
        run(router, out_dir)
