// Gradients of the whole MoE layer (router gates, experts, shared expert, aux losses) by central finite
// differences in float64.
#include "moeforge/layer/moe_layer.h"
#include "moeforge/routing/topk.h"
#include "test_util.h"

namespace moeforge {
namespace {

// Central differences with eps = 1e-6 have truncation error O(eps^2 * f''') ~ 1e-12 and rounding error
// O(1e-16 / eps) ~ 1e-10 relative to f; 1e-6 absolute leaves room for both on O(1) values. The routing
// choice is piecewise constant; with random inputs no top-K boundary lies within eps.
constexpr double kAtol = 1e-6, kRtol = 1e-5;

void check_layer(MoEConfig cfg, const std::string& what) {
  SCOPED_TRACE(what);
  torch::manual_seed(5);
  const int64_t B = 2, S = 3, C = 4;
  MoELayer layer(cfg, C);
  layer->to(torch::kDouble);
  auto x = torch::randn({B, S, C}, torch::kDouble).requires_grad_();
  auto gy = torch::randn({B, S, C}, torch::kDouble);
  auto loss_fn = [&] {
    auto out = layer->forward(x);
    return (out.y * gy).sum() + out.plan.aux_loss;
  };
  loss_fn().backward();
  auto& router = dynamic_cast<TopKRouterImpl&>(*layer->router);
  std::vector<std::pair<std::string, torch::Tensor>> params = {{"x", x},
                                                               {"router", router.weight},
                                                               {"w_up", layer->experts->w_up},
                                                               {"w_down", layer->experts->w_down}};
  if (cfg.expert_act == ExpertAct::kSwiGLU) params.push_back({"w_gate", layer->experts->w_gate});
  if (cfg.n_shared_expert) params.push_back({"shared.w_up", layer->shared->w_up});
  for (auto& [name, p] : params) {
    SCOPED_TRACE(name);
    auto analytic = p.grad().clone();
    auto numeric = test::numeric_grad(loss_fn, p.detach());
    EXPECT_TENSOR_NEAR(analytic, numeric, kAtol, kRtol);
  }
}

TEST(GradCheck, TopTwoSoftmaxSwiGLUWithAuxLosses) {
  MoEConfig cfg;
  cfg.n_expert = 4;
  cfg.n_expert_used = 2;
  cfg.d_expert = 3;
  cfg.balance_coef = 0.1;  // large coefficients so that the aux-loss gradients are visible
  cfg.seq_balance_coef = 0.1;
  cfg.z_loss_coef = 0.1;
  check_layer(cfg, "grouped");
  cfg.experts_impl = ExpertsImplKind::kReference;
  check_layer(cfg, "reference");
}

TEST(GradCheck, SigmoidGELUSharedNoRenorm) {
  MoEConfig cfg;
  cfg.n_expert = 5;
  cfg.n_expert_used = 2;
  cfg.d_expert = 3;
  cfg.score = ScoreFunc::kSigmoid;
  cfg.expert_act = ExpertAct::kGELU;
  cfg.n_shared_expert = 1;
  cfg.z_loss_coef = 0.1;
  check_layer(cfg, "sigmoid gelu shared");
  cfg.score = ScoreFunc::kSoftmax;
  cfg.renormalize = false;
  cfg.n_expert_used = 1;
  check_layer(cfg, "switch gelu shared");
}

}  // namespace
}  // namespace moeforge
