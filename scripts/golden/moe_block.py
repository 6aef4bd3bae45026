"""PyTorch reference of a Mixtral-style MoE block (top-K token choice, SwiGLU experts) and of the
auxiliary losses of docs/routing.md section 8, with inputs, outputs and gradients, in float64.

Weights use nn.Linear's layout stacked over experts: router [E, C], w_gate/w_up [E, F, C], w_down [E, C, F].
"""
import torch
import torch.nn.functional as F

from safetensors_io import save


def moe_block(x, w_router, w_gate, w_up, w_down, k, score, renormalize, shared=None):
    logits = x @ w_router.t()                                   # [T, E]
    if score == "softmax":
        scores = torch.softmax(logits, dim=1)
        probs = scores
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(1, keepdim=True)
    top_v, top_i = scores.topk(k, dim=1)                       # [T, K]
    gates = top_v / top_v.sum(1, keepdim=True) if (renormalize or score == "sigmoid") else top_v
    y = torch.zeros_like(x)
    for e in range(w_router.shape[0]):
        tok, rank = (top_i == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xs = x[tok]
        h = F.silu(xs @ w_gate[e].t()) * (xs @ w_up[e].t())
        y = y.index_add(0, tok, (h @ w_down[e].t()) * gates[tok, rank].unsqueeze(1))
    if shared is not None:
        sg, su, sd = shared
        y = y + (F.silu(x @ sg.t()) * (x @ su.t())) @ sd.t()
    return y, logits, probs, top_i


def balance_loss(probs, choices, n_seq):
    T, E = probs.shape
    K = choices.shape[1]
    S = T // n_seq
    counts = torch.zeros(n_seq, E, dtype=probs.dtype)
    counts.scatter_add_(1, choices.reshape(n_seq, S * K), torch.ones(n_seq, S * K, dtype=probs.dtype))
    f = counts / (S * K)
    P = probs.reshape(n_seq, S, E).mean(1)
    return (E * (f * P).sum(1)).mean()


def z_loss(logits):
    return torch.logsumexp(logits, dim=1).pow(2).mean()


def case(out_dir, name, seed, B, S, C, Fh, E, K, score, renormalize, n_shared,
         alpha=1e-2, alpha_seq=1e-4, beta=1e-3):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    T = B * S
    x = torch.randn(T, C, generator=g, dtype=d).requires_grad_()
    w_router = (torch.randn(E, C, generator=g, dtype=d) * 0.5).requires_grad_()
    w_gate = (torch.randn(E, Fh, C, generator=g, dtype=d) / C ** 0.5).requires_grad_()
    w_up = (torch.randn(E, Fh, C, generator=g, dtype=d) / C ** 0.5).requires_grad_()
    w_down = (torch.randn(E, C, Fh, generator=g, dtype=d) / Fh ** 0.5).requires_grad_()
    shared = None
    tensors = {}
    if n_shared:
        shared = tuple(t.requires_grad_() for t in (
            torch.randn(n_shared * Fh, C, generator=g, dtype=d) / C ** 0.5,
            torch.randn(n_shared * Fh, C, generator=g, dtype=d) / C ** 0.5,
            torch.randn(C, n_shared * Fh, generator=g, dtype=d) / (n_shared * Fh) ** 0.5))
    gy = torch.randn(T, C, generator=g, dtype=d)
    y, logits, probs, top_i = moe_block(x, w_router, w_gate, w_up, w_down, K, score, renormalize, shared)
    bal = balance_loss(probs, top_i, 1)
    seq_bal = balance_loss(probs, top_i, B)
    zl = z_loss(logits)
    aux = alpha * bal + alpha_seq * seq_bal + beta * zl
    loss = (y * gy).sum() + aux
    loss.backward()
    tensors.update({
        "x": x, "w_router": w_router, "w_gate": w_gate, "w_up": w_up, "w_down": w_down, "grad_y": gy,
        "y": y, "logits": logits, "probs": probs, "choices": top_i,
        "balance_loss": bal, "seq_balance_loss": seq_bal, "z_loss": zl, "aux_loss": aux,
        "grad_x": x.grad, "grad_w_router": w_router.grad, "grad_w_gate": w_gate.grad,
        "grad_w_up": w_up.grad, "grad_w_down": w_down.grad,
    })
    if shared is not None:
        for n, t in zip(("shared_w_gate", "shared_w_up", "shared_w_down"), shared):
            tensors[n] = t
            tensors["grad_" + n] = t.grad
    meta = dict(B=B, S=S, C=C, F=Fh, E=E, K=K, score=score, renormalize=int(renormalize), n_shared=n_shared,
                balance_coef=alpha, seq_balance_coef=alpha_seq, z_loss_coef=beta)
    save(f"{out_dir}/{name}.safetensors", tensors, meta)


def write(out_dir):
    # Mixtral: softmax scores, top-2 renormalised, SwiGLU experts.
    case(out_dir, "moe_mixtral", 1, B=2, S=6, C=8, Fh=16, E=4, K=2, score="softmax", renormalize=True,
         n_shared=0)
    # DeepSeek-V3 style: sigmoid scores (always renormalised), one shared expert, top-3 of 6.
    case(out_dir, "moe_sigmoid_shared", 2, B=3, S=4, C=8, Fh=12, E=6, K=3, score="sigmoid", renormalize=True,
         n_shared=1)
    # Switch: top-1 softmax, no renormalisation (gate = the selected probability).
    case(out_dir, "moe_switch", 3, B=2, S=5, C=6, Fh=10, E=4, K=1, score="softmax", renormalize=False,
         n_shared=0)
