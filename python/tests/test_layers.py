"""moeforge.MoE and moeforge.MixtralSparseMoeBlock against their definitions (docs/python.md)."""
import pytest
import torch
import torch.nn.functional as F

import moeforge

C = 16


def make(router, **options):
    """A small layer of each router, with the settings its definition needs (groups of 2 for the two-stage
    routers)."""
    extra = {"hierarchical": dict(n_cluster=2), "moce": dict(n_cluster=2)}.get(router, {})
    extra.update(options)
    return moeforge.MoE(C, 4, 2 if router not in ("moce",) else 1, 12, router=router, **extra)


def test_routers_lists_every_router_with_its_options():
    names = [r["name"] for r in moeforge.routers()]
    assert names == ["topk", "expert_choice", "loss_free", "bip", "hierarchical", "moce"]
    ec = next(r for r in moeforge.routers() if r["name"] == "expert_choice")
    assert ec["options"]["ec_capacity_factor"] == "2.0"
    assert "capacity_factor" in moeforge.common_options()


@pytest.mark.parametrize("router", [r["name"] for r in moeforge.routers()])
def test_every_router_runs_forward_and_backward(router):
    torch.manual_seed(0)
    layer = make(router)
    x = torch.randn(2, 6, C, requires_grad=True)
    y, r = layer(x)
    assert y.shape == x.shape
    (y.pow(2).mean() + r.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert len(r.load) == 4 and r.n_tokens == 12


@pytest.mark.parametrize("router", [r["name"] for r in moeforge.routers()])
def test_gradcheck_in_float64(router):
    # Routing is piecewise constant in x: a central difference of 1e-6 never moves a token to another expert
    # for these inputs, so the layer is differentiable there and float64 gradients match to 1e-4.
    torch.manual_seed(1)
    layer = make(router).double()
    x = torch.randn(2, 4, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_topk_layer_is_its_definition():
    # Top-2 of the router's softmax, gates renormalised over the two (Mixtral), SwiGLU experts, summed.
    torch.manual_seed(2)
    layer = make("topk")
    x = torch.randn(3, 5, C)
    y, _ = layer(x)
    sd = layer.state_dict()
    flat = x.reshape(-1, C)
    p = torch.softmax(flat @ sd["router.weight"].t(), -1)
    g, e = p.topk(2, -1)
    g = g / g.sum(-1, keepdim=True)
    ref = torch.zeros_like(flat)
    for k in range(2):
        for t in range(flat.shape[0]):
            i = e[t, k]
            h = F.silu(sd["experts.w_gate"][i] @ flat[t]) * (sd["experts.w_up"][i] @ flat[t])
            ref[t] += g[t, k] * (sd["experts.w_down"][i] @ h)
    # float32, other summation orders: agreement to 1e-5 relative.
    torch.testing.assert_close(y.reshape(-1, C), ref, rtol=1e-5, atol=1e-6)


class PlainMixtralBlock(torch.nn.Module):
    """Hugging Face's MixtralSparseMoeBlock as a user writes it (router logits, softmax, top-k, renormalise,
    a loop over experts with index_add)."""

    def __init__(self, hidden, inter, n_expert, k):
        super().__init__()
        self.top_k = k
        self.gate = torch.nn.Linear(hidden, n_expert, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.ModuleDict(dict(
            w1=torch.nn.Linear(hidden, inter, bias=False), w2=torch.nn.Linear(inter, hidden, bias=False),
            w3=torch.nn.Linear(hidden, inter, bias=False))) for _ in range(n_expert))

    def forward(self, hidden_states):
        b, s, c = hidden_states.shape
        x = hidden_states.view(-1, c)
        router_logits = self.gate(x)
        w = F.softmax(router_logits, dim=1, dtype=torch.float)
        w, chosen = torch.topk(w, self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            idx, top = torch.where(mask[e])
            if top.numel() == 0:
                continue
            cur = x[top]
            h = expert["w2"](F.silu(expert["w1"](cur)) * expert["w3"](cur)) * w[top, idx, None]
            out.index_add_(0, top, h)
        return out.view(b, s, c), router_logits


def test_mixtral_block_matches_a_plain_pytorch_block_with_copied_weights():
    torch.manual_seed(3)
    ours = moeforge.MixtralSparseMoeBlock(C, 24, 4, 2)
    names = set(ours.state_dict())
    assert "gate.weight" in names and "experts.3.w2.weight" in names and len(names) == 1 + 4 * 3
    plain = PlainMixtralBlock(C, 24, 4, 2)
    plain.load_state_dict(ours.state_dict())  # the same names: Hugging Face's
    x = torch.randn(2, 7, C, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, logits = ours(x)
    y2, logits2 = plain(x2)
    # float32 with other summation orders (grouped GEMMs against per-expert Linear): 1e-5 relative.
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, logits2, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)
    for (n, p), (n2, p2) in zip(sorted(ours.named_parameters()), sorted(plain.named_parameters())):
        assert n == n2
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_a_plain_optimizer_trains_the_layer_and_after_step_moves_router_state():
    torch.manual_seed(4)
    layer = make("loss_free", bias_update_rate=0.05)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    bias0 = layer.state_dict()["router.bias"].clone()
    w0 = layer.state_dict()["router.weight"].clone()
    x = torch.randn(4, 8, C)
    y, r = layer(x)
    (y.pow(2).mean() + r.aux_loss).backward()
    opt.step()
    moeforge.after_step(layer)
    assert not torch.equal(layer.state_dict()["router.weight"], w0), "the optimiser did not move the C++ weight"
    assert not torch.equal(layer.state_dict()["router.bias"], bias0), "after_step did not move the bias"
    layer.eval()
    with torch.no_grad():
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"evaluation changed {k}"


def test_measures():
    torch.manual_seed(5)
    assert moeforge.max_vio([1, 1, 1, 1]) == 0
    assert moeforge.max_vio([2, 1, 1, 0]) == pytest.approx(1.0)
    topk = make("topk")
    x = torch.randn(3, 8, C)
    same, other, trials = moeforge.causal_leak(topk, x)
    # Causal routing: only float rounding moves (an expert's GEMM takes other row counts when the future
    # changes), far below the leak of a non-causal router.
    assert same < 1e-6 and other < 1e-6 and trials > 0
    ec = make("expert_choice", ec_mode="noncausal")
    same, other, _ = moeforge.causal_leak(ec, x, training=True)
    assert max(same, other) > 0
    y, r = topk(x)
    optimum, objective, gap, violation = moeforge.optimality_gap(topk, x, r)
    assert optimum > 0 and gap > -1e-6 or violation > 0
    mi, purity = moeforge.specialization(torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
    assert mi == pytest.approx(1.0)
    h = make("hierarchical")
    h.train()
    h(x)
    moeforge.after_step(h)
    rel, util = h.get_reliability_stats(), h.get_expert_utilization()
    assert set(rel["experts"]) == {0, 1, 2, 3} and set(rel["clusters"]) == {0, 1}
    assert sum(e["load"] for e in util["experts"].values()) == 48  # 24 tokens x 2 experts
    with pytest.raises(ValueError, match="no clusters"):
        topk.get_reliability_stats()


def test_bad_arguments_raise_named_python_errors():
    with pytest.raises(ValueError, match="router 'nope'"):
        moeforge.MoE(C, 4, router="nope")
    with pytest.raises(TypeError, match="unexpected option 'frobnicate'"):
        moeforge.MoE(C, 4, frobnicate=1)
    with pytest.raises(ValueError, match="moe.n_expert_used"):
        moeforge.MoE(C, 4, 9)
    with pytest.raises(ValueError, match="moe.ec_capacity_factor"):
        moeforge.MoE(C, 4, router="expert_choice", ec_capacity_factor=-1.0)
    with pytest.raises(TypeError, match="moe.capacity_factor"):
        moeforge.MoE(C, 4, capacity_factor="big")
    with pytest.raises(TypeError, match="n_expert"):
        moeforge.MoE(C, "four")
    layer = moeforge.MoE(C, 4)
    with pytest.raises(ValueError, match="d_model = 16"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="Double"):
        layer(torch.randn(2, 3, C, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, C, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([1, 2, 3])
    with pytest.raises(OSError, match="no_such_checkpoint"):
        moeforge.load("/tmp/no_such_checkpoint")
