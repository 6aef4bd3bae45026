"""The plain-PyTorch peer of `moeforge bench --train` (issue 11; docs/performance.md, "End to end"): the
embedded default model written as a user would in PyTorch, with a Mixtral-style MoE block that loops over
its experts, trained on random tokens with AdamW, and timed the same way (steps after one warm-up, median).

Same shape as configs/default.toml: vocabulary 2048, d_model 128, 4 layers of 4 heads, RoPE (half-split),
RMSNorm, layers 1 and 3 dense SwiGLU FFNs of width 344, layers 2 and 4 MoE with 16 SwiGLU experts of width
172, top-2; tied embedding; batch 16 x 128 tokens. The one difference is the router: a flat softmax top-2
over the 16 experts with renormalised gates (the default's MoCE routes inside a cluster's group of 4; its
route costs 1.5% of a moeforge step, docs/performance.md), so the parameter count is moeforge's minus the
MoCE routers' and centroids' difference.

With --shape wide, the wider model of docs/performance.md ("bf16 training"): d_model 512, 8 heads, dense
width 1376, experts of 688 (moeforge: --set model.d_model=512 --set model.n_head=8 --set model.d_ff=1376
--set moe.d_expert=688 --set moe.router='"topk"'). With --autocast bf16 the step's forward runs under
torch.autocast("cpu", dtype=torch.bfloat16), as a PyTorch user trains in mixed precision on a CPU with
bf16 (the weights and AdamW stay float32).

    /usr/bin/python3 bench/pytorch_peer.py [--steps N] [--threads T] [--shape default|wide]
        [--autocast none|bf16] [--json FILE]

Prints one line "peer: ... tokens/s"; --json writes {"step_ms": [...], "median_ms", "tokens_per_s",
"params", "threads", "torch", "shape", "autocast"}.
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V, C, L, H, DFF, E, K, FE, B, S = 2048, 128, 4, 4, 344, 16, 2, 172, 16, 128
SHAPES = {"default": (128, 4, 344, 172), "wide": (512, 8, 1376, 688)}  # C, H, DFF, FE


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.out = nn.Linear(C, C, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, C // H).unbind(2)
        q, k, v = rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, s, C))


class SwiGLU(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gate = nn.Linear(C, width, bias=False)
        self.up = nn.Linear(C, width, bias=False)
        self.down = nn.Linear(width, C, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Mixtral's sparse block as transformers writes it: softmax router, top-K, gates renormalised, a loop
    over the experts with index_select / index_add."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(C, E, bias=False)
        self.experts = nn.ModuleList([SwiGLU(FE) for _ in range(E)])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, C)
        probs = self.router(x).softmax(-1)
        w, idx = probs.topk(K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            if rows.numel() == 0:
                continue
            # .to(y.dtype): under autocast the expert's output is bf16 and index_add_ wants y's dtype.
            y.index_add_(0, rows, (expert(x[rows]) * w[rows, slot].unsqueeze(1)).to(y.dtype))
        # The Switch / GShard balance loss, as moeforge's default trains with (balance_coef 0.01).
        load = F.one_hot(idx, E).float().sum((0, 1)) / idx.numel()
        aux = E * (load * probs.mean(0)).sum()
        return y.view(shape), aux


class Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.n1, self.n2 = RMSNorm(C), RMSNorm(C)
        self.attn = Attention()
        self.ffn = MoE() if moe else SwiGLU(DFF)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.n1(x), cos, sin, mask)
        y = self.ffn(self.n2(x))
        if isinstance(y, tuple):
            return x + y[0], y[1]
        return x + y, x.new_zeros(())


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(V, C) * 0.02)
        self.blocks = nn.ModuleList([Block(moe=(i + 1) % 2 == 0) for i in range(L)])
        self.norm = RMSNorm(C)
        d = C // H
        ang = torch.outer(torch.arange(S, dtype=torch.float64), 10000.0 ** (-torch.arange(0, d, 2) / d))
        self.register_buffer("cos", ang.cos().float())
        self.register_buffer("sin", ang.sin().float())
        self.register_buffer("mask", torch.ones(S, S, dtype=torch.bool).triu(1))

    def forward(self, tokens):
        x = self.emb[tokens]
        aux = x.new_zeros(())
        for blk in self.blocks:
            x, a = blk(x, self.cos, self.sin, self.mask)
            aux = aux + a
        return self.norm(x) @ self.emb.t(), aux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none")
    ap.add_argument("--json")
    a = ap.parse_args()
    global C, H, DFF, FE
    C, H, DFF, FE = SHAPES[a.shape]
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    model = LM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = torch.randint(0, V, (a.steps + 1, B, S + 1))

    def step(i):
        tok = data[i]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.autocast == "bf16"):
            logits, aux = model(tok[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, V), tok[:, 1:].reshape(-1)) + 0.01 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step(0)  # warm-up
    ms = []
    for i in range(1, a.steps + 1):
        t0 = time.perf_counter()
        step(i)
        ms.append((time.perf_counter() - t0) * 1e3)
    med = sorted(ms)[len(ms) // 2] if len(ms) % 2 else sum(sorted(ms)[len(ms) // 2 - 1:len(ms) // 2 + 1]) / 2
    params = sum(p.numel() for p in model.parameters())
    out = {"step_ms": ms, "median_ms": med, "tokens_per_s": B * S / (med / 1e3), "params": params,
           "threads": a.threads, "torch": torch.__version__, "shape": a.shape, "autocast": a.autocast}
    print(f"peer: plain PyTorch {torch.__version__}, {a.shape} shape, autocast {a.autocast}, {a.threads} "
          f"threads, {params} parameters: "
          f"{med:.1f} ms per step (median of {a.steps}), {out['tokens_per_s']:.0f} tokens/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
