// The fused MoE function (dispatch -> experts -> combine in one autograd function, CPU kernels) against
// its plain twin moe_plain_loop: outputs and gradients of x, the gates and all weights, in float64 and
// float32, with empty experts, skewed loads, decode sizes (the small-GEMM path) and workspace reuse.
#include "moeforge/layer/dispatch.h"
#include "moeforge/layer/fused_moe.h"
#include "moeforge/layer/moe_layer.h"
#include "test_util.h"

namespace moeforge {
namespace {

struct Case {
  int64_t T, C, F, E, K;
  bool skewed;  // draw experts from a Zipf-like law, so some experts get most rows and some none
  ExpertAct act = ExpertAct::kSwiGLU;
};

struct Result {
  torch::Tensor y, dx, dgate, dw_gate, dw_up, dw_down;
};

// Experts [T, K] without repeats inside a token (token-choice top-K), uniform or skewed.
torch::Tensor draw_experts(const Case& c) {
  auto probs = torch::ones({c.E}, torch::kDouble);
  if (c.skewed) probs = torch::arange(1, c.E + 1, torch::kDouble).pow(-1.5);
  return torch::multinomial(probs.expand({c.T, c.E}), c.K, /*replacement=*/false);  // [T, K]
}

Result run(bool fused, const Case& c, torch::ScalarType dtype, const torch::Tensor& experts, Workspace* ws) {
  torch::manual_seed(3);
  auto opt = torch::TensorOptions().dtype(dtype);
  auto x = torch::randn({c.T, c.C}, opt).requires_grad_();
  auto gate_tk = torch::rand({c.T, c.K}, opt).add_(0.1).requires_grad_();  // [T, K]
  const double s_in = 1.0 / std::sqrt(double(c.C)), s_ff = 1.0 / std::sqrt(double(c.F));
  auto w_gate = (torch::randn({c.E, c.F, c.C}, opt) * s_in).requires_grad_();
  if (c.act == ExpertAct::kGELU) w_gate = torch::Tensor();  // GELU experts have no gate projection
  auto w_up = (torch::randn({c.E, c.F, c.C}, opt) * s_in).requires_grad_();
  auto w_down = (torch::randn({c.E, c.C, c.F}, opt) * s_ff).requires_grad_();
  auto gy = torch::randn({c.T, c.C}, opt);
  ExpertWeights w{c.act, w_gate, w_up, w_down};
  auto plan = build_plan_from_choices(experts, {}, {}, gate_tk, c.E, 0);
  auto y = fused ? fused_moe(x, plan, w, ws) : moe_plain_loop(x, plan, w);
  y.backward(gy);
  return {y.detach(),  x.grad(),     gate_tk.grad(), w_gate.defined() ? w_gate.grad() : torch::Tensor(),
          w_up.grad(), w_down.grad()};
}

void expect_match(const Case& c, torch::ScalarType dtype, double atol, double rtol, Workspace* ws) {
  torch::manual_seed(c.T * 31 + c.E);
  auto experts = draw_experts(c);
  auto ref = run(false, c, dtype, experts, nullptr);
  auto fast = run(true, c, dtype, experts, ws);
  EXPECT_TENSOR_NEAR(fast.y, ref.y, atol, rtol);
  EXPECT_TENSOR_NEAR(fast.dx, ref.dx, atol, rtol);
  EXPECT_TENSOR_NEAR(fast.dgate, ref.dgate, atol, rtol);
  if (c.act == ExpertAct::kSwiGLU) {
    EXPECT_TENSOR_NEAR(fast.dw_gate, ref.dw_gate, atol, rtol);
  }
  EXPECT_TENSOR_NEAR(fast.dw_up, ref.dw_up, atol, rtol);
  EXPECT_TENSOR_NEAR(fast.dw_down, ref.dw_down, atol, rtol);
}

// float64: the same products summed in another order (BLAS vs the small kernel, fused vs separate
// activation, libmvec exp within a few ulp); values are O(1), so 1e-11 is ~1e5 ulp of slack and far
// below any indexing or gating error (O(0.1)).
constexpr double kAtol64 = 1e-11, kRtol64 = 1e-9;
// float32: sums of up to a few hundred products of O(1) values, accumulated in another order; ~1e-6
// relative per product, grown by sqrt(length), stays below 1e-4.
constexpr double kAtol32 = 1e-4, kRtol32 = 1e-3;

TEST(FusedMoE, MatchesPlainLoopFloat64) {
  for (const Case& c : {Case{40, 8, 12, 6, 2, false}, Case{64, 8, 12, 6, 2, true},  // large groups (BLAS)
                        Case{1, 8, 12, 6, 2, false}, Case{4, 8, 12, 6, 2, false},   // decode: small path
                        Case{16, 8, 12, 16, 2, true}, Case{300, 16, 20, 8, 3, true}}) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) + (c.skewed ? " skewed" : ""));
    expect_match(c, torch::kDouble, kAtol64, kRtol64, nullptr);
  }
}

TEST(FusedMoE, MatchesPlainLoopFloat32) {
  for (const Case& c : {Case{200, 32, 48, 8, 2, false}, Case{200, 32, 48, 8, 2, true},
                        Case{4, 32, 48, 16, 2, false}, Case{16, 32, 48, 16, 2, true}}) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) + (c.skewed ? " skewed" : ""));
    expect_match(c, torch::kFloat, kAtol32, kRtol32, nullptr);
  }
}

TEST(FusedMoE, GELUExpertsMatchPlainLoop) {
  // GELU experts (Switch, GShard): one up projection, exact erf GELU with the gate folded in; its
  // gradient through erf and exp from libmvec (a few ulp) against LibTorch's gelu and gelu_backward.
  const auto gelu = ExpertAct::kGELU;
  for (const Case& c : {Case{40, 8, 12, 6, 2, false, gelu}, Case{64, 8, 12, 6, 2, true, gelu},
                        Case{1, 8, 12, 6, 2, false, gelu}, Case{16, 8, 12, 16, 2, true, gelu}}) {
    SCOPED_TRACE("float64 T=" + std::to_string(c.T) + (c.skewed ? " skewed" : ""));
    expect_match(c, torch::kDouble, kAtol64, kRtol64, nullptr);
  }
  for (const Case& c : {Case{200, 32, 48, 8, 2, true, gelu}, Case{4, 32, 48, 16, 2, false, gelu}}) {
    SCOPED_TRACE("float32 T=" + std::to_string(c.T) + (c.skewed ? " skewed" : ""));
    expect_match(c, torch::kFloat, kAtol32, kRtol32, nullptr);
  }
}

TEST(FusedMoE, EmptyExpertsGetZeroGradient) {
  // Every token picks experts 0 and 2 of 5: experts 1, 3, 4 have no rows.
  const Case c{10, 6, 8, 5, 2, false};
  auto experts = torch::tensor({0, 2}, torch::kLong).repeat({c.T, 1});  // [T, 2]
  auto ref = run(false, c, torch::kDouble, experts, nullptr);
  auto fast = run(true, c, torch::kDouble, experts, nullptr);
  EXPECT_TENSOR_NEAR(fast.y, ref.y, kAtol64, kRtol64);
  EXPECT_TENSOR_NEAR(fast.dw_up, ref.dw_up, kAtol64, kRtol64);
  for (int64_t e : {1, 3, 4}) {
    EXPECT_EQ(fast.dw_gate[e].abs().max().item<double>(), 0.0);
    EXPECT_EQ(fast.dw_down[e].abs().max().item<double>(), 0.0);
  }
}

TEST(FusedMoE, WorkspaceReuseGivesTheSameResults) {
  // The second and third calls reuse the first call's buffers (and a smaller N reuses larger ones).
  Workspace ws;
  for (const Case& c :
       {Case{50, 8, 12, 6, 2, false}, Case{50, 8, 12, 6, 2, true}, Case{7, 8, 12, 6, 2, false}})
    expect_match(c, torch::kDouble, kAtol64, kRtol64, &ws);
  EXPECT_GT(ws.bytes(), 0);
}

TEST(FusedMoE, LayerUsesItAndMatchesTheReferenceLayer) {
  for (auto act : {ExpertAct::kSwiGLU, ExpertAct::kGELU}) {
    SCOPED_TRACE(to_string(act));
    torch::manual_seed(5);
    MoEConfig cfg;
    cfg.n_expert = 6;
    cfg.n_expert_used = 2;
    cfg.d_expert = 8;
    cfg.expert_act = act;
    MoELayer fast(cfg, 5);
    cfg.experts_impl = ExpertsImplKind::kReference;
    MoELayer ref(cfg, 5);
    auto pf = fast->named_parameters(), pr = ref->named_parameters();
    {
      torch::NoGradGuard ng;
      for (auto& kv : pf) pr[kv.key()].copy_(kv.value());
    }
    auto x = torch::randn({30, 5});
    auto yf = fast->forward(x).y, yr = ref->forward(x).y;
    EXPECT_TENSOR_NEAR(yf, yr, kAtol32, kRtol32);
    EXPECT_GT(fast->experts->workspace().bytes(), 0);  // the fused path ran
    yf.sum().backward();
    yr.sum().backward();
    for (auto& kv : pf)
      EXPECT_TENSOR_NEAR(kv.value().grad(), pr[kv.key()].grad(), kAtol32, kRtol32) << kv.key();
  }
}

// Gradient-accumulation fusion (grouped_ops.h fusable_grad): weight gradients are added into existing
// .grad tensors by the GEMMs themselves. Every way autograd can be driven must still see the right values.
struct Twins {
  torch::Tensor x, gate_tk, gy1, gy2;
  ExpertWeights fused, plain;  // equal values, separate leaves
  RoutingPlan plan_fused, plan_plain;
};

Twins make_twins(const Case& c) {
  torch::manual_seed(11);
  auto opt = torch::TensorOptions().dtype(torch::kDouble);
  Twins t;
  t.x = torch::randn({c.T, c.C}, opt);
  t.gate_tk = torch::rand({c.T, c.K}, opt).add_(0.1);
  t.gy1 = torch::randn({c.T, c.C}, opt);
  t.gy2 = torch::randn({c.T, c.C}, opt);
  auto experts = draw_experts(c);
  auto wg = torch::randn({c.E, c.F, c.C}, opt) * 0.3, wu = torch::randn({c.E, c.F, c.C}, opt) * 0.3,
       wd = torch::randn({c.E, c.C, c.F}, opt) * 0.3;
  auto leaf = [](const torch::Tensor& v) { return v.clone().requires_grad_(); };
  t.fused = {ExpertAct::kSwiGLU, leaf(wg), leaf(wu), leaf(wd)};
  t.plain = {ExpertAct::kSwiGLU, leaf(wg), leaf(wu), leaf(wd)};
  t.plan_fused = build_plan_from_choices(experts, {}, {}, t.gate_tk, c.E, 0);
  t.plan_plain = t.plan_fused;
  return t;
}

std::vector<torch::Tensor> leaves(const ExpertWeights& w) {
  return {w.w_gate, w.w_up, w.w_down};
}

TEST(FusedMoE, AccumulatesWeightGradientsIntoExistingGrad) {
  const Case c{60, 8, 12, 6, 2, true};
  auto t = make_twins(c);
  Workspace ws;
  const int64_t before = fused_grad_accumulations();
  // Two backward passes without zeroing (gradient accumulation); the first finds no .grad (returned as
  // usual), the second finds one and adds into it.
  for (const auto& gy : {t.gy1, t.gy2}) {
    fused_moe(t.x, t.plan_fused, t.fused, &ws).backward(gy);
    moe_plain_loop(t.x, t.plan_plain, t.plain).backward(gy);
  }
  EXPECT_EQ(fused_grad_accumulations() - before, 3);  // the second pass, three weights
  for (size_t i = 0; i < 3; ++i)
    EXPECT_TENSOR_NEAR(leaves(t.fused)[i].grad(), leaves(t.plain)[i].grad(), kAtol64, kRtol64);
  // A third pass after zeroing in place, as the trainer does.
  for (auto& w : leaves(t.fused)) w.mutable_grad().zero_();
  for (auto& w : leaves(t.plain)) w.mutable_grad().zero_();
  fused_moe(t.x, t.plan_fused, t.fused, &ws).backward(t.gy1);
  moe_plain_loop(t.x, t.plan_plain, t.plain).backward(t.gy1);
  EXPECT_EQ(fused_grad_accumulations() - before, 6);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_TENSOR_NEAR(leaves(t.fused)[i].grad(), leaves(t.plain)[i].grad(), kAtol64, kRtol64);
}

TEST(FusedMoE, AutogradGradAndHooksSeeTheWeightGradient) {
  const Case c{40, 8, 12, 5, 2, false};
  auto t = make_twins(c);
  for (auto* w : {&t.fused, &t.plain})
    for (auto& p : leaves(*w)) p.mutable_grad() = torch::zeros_like(p);
  const int64_t before = fused_grad_accumulations();
  // torch::autograd::grad: gradients are returned, .grad is left alone.
  auto g_fused = torch::autograd::grad({fused_moe(t.x, t.plan_fused, t.fused)}, leaves(t.fused), {t.gy1});
  auto g_plain =
      torch::autograd::grad({moe_plain_loop(t.x, t.plan_plain, t.plain)}, leaves(t.plain), {t.gy1});
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TENSOR_NEAR(g_fused[i], g_plain[i], kAtol64, kRtol64);
    EXPECT_EQ(leaves(t.fused)[i].grad().abs().max().item<double>(), 0.0);
  }
  // backward(inputs = some weights): only those get gradients.
  fused_moe(t.x, t.plan_fused, t.fused).backward(t.gy1, false, false, {{t.fused.w_up}});
  EXPECT_TENSOR_NEAR(t.fused.w_up.grad(), g_plain[1], kAtol64, kRtol64);
  EXPECT_EQ(t.fused.w_gate.grad().abs().max().item<double>(), 0.0);
  // A hook on a weight sees (and may change) its gradient before accumulation.
  auto hook = [](torch::Tensor g) { return g * 2; };
  t.fused.w_down.register_hook(hook);
  t.plain.w_down.register_hook(hook);
  fused_moe(t.x, t.plan_fused, t.fused).backward(t.gy2);
  moe_plain_loop(t.x, t.plan_plain, t.plain).backward(t.gy2);
  EXPECT_TENSOR_NEAR(t.fused.w_down.grad(), t.plain.w_down.grad(), kAtol64, kRtol64);
  EXPECT_EQ(fused_grad_accumulations() - before, 2);  // only w_gate and w_up of the last plain backward
}

TEST(FusedMoE, FrozenWeightsGetNoGradient) {
  const Case c{30, 8, 12, 4, 2, false};
  auto t = make_twins(c);
  t.fused.w_down.set_requires_grad(false);
  t.plain.w_down.set_requires_grad(false);
  fused_moe(t.x, t.plan_fused, t.fused).backward(t.gy1);
  moe_plain_loop(t.x, t.plan_plain, t.plain).backward(t.gy1);
  EXPECT_FALSE(t.fused.w_down.grad().defined());
  EXPECT_TENSOR_NEAR(t.fused.w_gate.grad(), t.plain.w_gate.grad(), kAtol64, kRtol64);
}

TEST(FusedMoE, NoGradForwardRunsInChunksAndMatches) {
  // Without autograd the experts run in chunks of ~1024 rows: 1400 or 2600 rows here give several
  // chunks, and the skewed case (each token picks one of 4 experts twice as likely as the next) has one
  // expert with more rows than a chunk.
  for (const Case& c : {Case{700, 8, 12, 8, 2, false}, Case{1300, 8, 12, 4, 2, true}}) {
    SCOPED_TRACE(c.skewed ? "skewed" : "uniform");
    torch::manual_seed(21);
    auto experts = draw_experts(c);
    auto opt = torch::TensorOptions().dtype(torch::kDouble);
    auto x = torch::randn({c.T, c.C}, opt);
    auto gate_tk = torch::rand({c.T, c.K}, opt);
    ExpertWeights w{ExpertAct::kSwiGLU, torch::randn({c.E, c.F, c.C}, opt),
                    torch::randn({c.E, c.F, c.C}, opt), torch::randn({c.E, c.C, c.F}, opt)};
    auto plan = build_plan_from_choices(experts, {}, {}, gate_tk, c.E, 0);
    if (c.skewed) {
      EXPECT_GT(plan.expert_offsets.diff().max().item<int64_t>(), 1024);
    }
    Workspace ws;
    auto y = fused_moe(x, plan, w, &ws);                         // nothing requires grad: the chunked path
    EXPECT_LT(ws.bytes(), c.T * c.K * (3 * c.F + 2 * c.C) * 8);  // smaller than the autograd path's
    EXPECT_TENSOR_NEAR(y, moe_plain_loop(x, plan, w), kAtol64, kRtol64);
    torch::NoGradGuard ng;  // grad mode off: chunked too, even with weights that require grad
    for (auto* t : {&w.w_gate, &w.w_up, &w.w_down}) t->requires_grad_();
    EXPECT_TENSOR_NEAR(fused_moe(x, plan, w, nullptr), y, kAtol64, kRtol64);
  }
}

TEST(FusedMoE, NoGradForwardOfGELUExpertsMatches) {
  const Case c{1300, 8, 12, 4, 2, true, ExpertAct::kGELU};  // one expert past a chunk, as above
  torch::manual_seed(22);
  auto experts = draw_experts(c);
  auto opt = torch::TensorOptions().dtype(torch::kDouble);
  auto x = torch::randn({c.T, c.C}, opt);
  auto gate_tk = torch::rand({c.T, c.K}, opt);
  ExpertWeights w{ExpertAct::kGELU, torch::Tensor(), torch::randn({c.E, c.F, c.C}, opt),
                  torch::randn({c.E, c.C, c.F}, opt)};
  auto plan = build_plan_from_choices(experts, {}, {}, gate_tk, c.E, 0);
  Workspace ws;
  EXPECT_TENSOR_NEAR(fused_moe(x, plan, w, &ws), moe_plain_loop(x, plan, w), kAtol64, kRtol64);
}

TEST(FusedMoE, MeasuresExpertHealthLikeTheReferencePath) {
  // Expert health (ClusterMoE reliability) from the fused path against the plain per-expert outputs:
  // RMS of each expert's ungated output rows and the count of rows with a NaN; expert 2 is poisoned.
  const Case c{80, 8, 12, 5, 2, false};
  torch::manual_seed(31);
  auto opt = torch::TensorOptions().dtype(torch::kDouble);
  auto experts = draw_experts(c);
  auto x = torch::randn({c.T, c.C}, opt);
  auto gate_tk = torch::rand({c.T, c.K}, opt).add_(0.1);
  ExpertWeights w{ExpertAct::kSwiGLU, torch::randn({c.E, c.F, c.C}, opt), torch::randn({c.E, c.F, c.C}, opt),
                  torch::randn({c.E, c.C, c.F}, opt)};
  w.w_down[2][0][0] = std::nan("");
  auto plan = build_plan_from_choices(experts, {}, {}, gate_tk, c.E, 0);
  auto off = plan.offsets();
  auto y_sorted = experts_reference(dispatch(x, plan), off, w);  // [N, C] ungated
  for (bool grad : {true, false}) {
    SCOPED_TRACE(grad ? "autograd path" : "no-grad path");
    for (auto* t : {&w.w_gate, &w.w_up, &w.w_down}) *t = t->detach().requires_grad_(grad);
    ExpertHealth health;
    Workspace ws;
    fused_moe(x, plan, w, &ws, &health);
    for (int64_t e = 0; e < c.E; ++e) {
      auto rows = y_sorted.narrow(0, off[e], off[e + 1] - off[e]);
      const auto bad = (~torch::isfinite(rows)).any(1).sum().item<int64_t>();
      EXPECT_EQ(health.nonfinite[e].item<int64_t>(), bad) << "expert " << e;
      if (e == 2) {
        EXPECT_GT(bad, 0);
        continue;  // its RMS is NaN on both sides
      }
      const double rms = rows.pow(2).mean(1).mean().sqrt().item<double>();
      EXPECT_NEAR(health.out_rms[e].item<double>(), rms, 1e-12 * rms) << "expert " << e;
    }
  }
}

}  // namespace
}  // namespace moeforge
