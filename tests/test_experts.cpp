// The grouped experts against the plain reference loop: same outputs and gradients, including experts
// with no rows, both activations, and the whole layer against the bench's plain loop.
#include "moeforge/layer/dispatch.h"
#include "moeforge/layer/experts.h"
#include "moeforge/layer/moe_layer.h"
#include "test_util.h"

namespace moeforge {
namespace {

// float64 on both sides with the same GEMMs per expert; only summation order differs.
constexpr double kAtol = 1e-11, kRtol = 1e-10;

struct Grads {
  torch::Tensor y, dx, dw_gate, dw_up, dw_down;
};

Grads run(ExpertsImplKind impl, ExpertAct act, const torch::Tensor& x0, const std::vector<int64_t>& off,
          const torch::Tensor& gy, uint64_t seed) {
  torch::manual_seed(seed);
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  Experts experts(E, x0.size(1), 6, act, impl);
  experts->to(torch::kDouble);
  auto x = x0.clone().requires_grad_();
  auto y = experts->forward(x, off);
  (y * gy).sum().backward();
  Grads g{y.detach(), x.grad(), {}, experts->w_up.grad(), experts->w_down.grad()};
  if (act == ExpertAct::kSwiGLU) g.dw_gate = experts->w_gate.grad();
  return g;
}

TEST(Experts, GroupedMatchesReference) {
  for (auto act : {ExpertAct::kSwiGLU, ExpertAct::kGELU}) {
    SCOPED_TRACE(to_string(act));
    // Expert 1 and expert 3 have no rows.
    const std::vector<int64_t> off = {0, 5, 5, 12, 12, 20};
    auto x = torch::randn({20, 4}, torch::kDouble);
    auto gy = torch::randn({20, 4}, torch::kDouble);
    auto ref = run(ExpertsImplKind::kReference, act, x, off, gy, 7);
    auto grp = run(ExpertsImplKind::kGrouped, act, x, off, gy, 7);
    EXPECT_TENSOR_NEAR(grp.y, ref.y, kAtol, kRtol);
    EXPECT_TENSOR_NEAR(grp.dx, ref.dx, kAtol, kRtol);
    EXPECT_TENSOR_NEAR(grp.dw_up, ref.dw_up, kAtol, kRtol);
    EXPECT_TENSOR_NEAR(grp.dw_down, ref.dw_down, kAtol, kRtol);
    if (act == ExpertAct::kSwiGLU) {
      EXPECT_TENSOR_NEAR(grp.dw_gate, ref.dw_gate, kAtol, kRtol);
    }
    // Experts without rows get exactly zero gradient.
    EXPECT_EQ(grp.dw_down[1].abs().max().item<double>(), 0.0);
    EXPECT_EQ(grp.dw_down[3].abs().max().item<double>(), 0.0);
  }
}

TEST(Experts, LayerMatchesPlainLoop) {
  torch::manual_seed(11);
  MoEConfig cfg;
  cfg.n_expert = 6;
  cfg.n_expert_used = 2;
  cfg.d_expert = 8;
  MoELayer layer(cfg, 5);
  layer->to(torch::kDouble);
  auto x = torch::randn({30, 5}, torch::kDouble);
  torch::NoGradGuard ng;
  auto out = layer->forward(x);
  auto loop = moe_plain_loop(x, out.plan, layer->experts->weights());
  EXPECT_TENSOR_NEAR(out.y, loop, kAtol, kRtol);
}

TEST(Experts, FineGrainedSplitIsAMatterOfShapes) {
  // DeepSeekMoE: m = 4 splits 4 experts of width 16 into 16 experts of width 4, with 4x as many active.
  MoEConfig cfg;
  cfg.n_expert = 4;
  cfg.n_expert_used = 1;
  cfg.d_expert = 16;
  cfg.expert_split = 4;
  MoELayer layer(cfg, 8);
  EXPECT_EQ(layer->router->n_expert(), 16);
  EXPECT_EQ(layer->experts->w_up.sizes(), (std::vector<int64_t>{16, 4, 8}));
  auto out = layer->forward(torch::randn({10, 8}));
  EXPECT_EQ(out.plan.n_assign(), 40);  // 10 tokens x 4 active fine-grained experts
  EXPECT_EQ(out.y.sizes(), (std::vector<int64_t>{10, 8}));
}

}  // namespace
}  // namespace moeforge
