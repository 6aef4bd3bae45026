// The C++ MoE layer against a PyTorch reference of the Mixtral-style block (scripts/golden/moe_block.py):
// forward output, aux losses and every gradient, in float64.
#include "moeforge/layer/moe_layer.h"
#include "moeforge/routing/losses.h"
#include "moeforge/routing/topk.h"
#include "test_util.h"

namespace moeforge {
namespace {

// Both sides compute in float64 with the same operations up to summation order: differences are a few ulps
// times the depth of the computation, far below 1e-10.
constexpr double kAtol = 1e-10, kRtol = 1e-9;

int64_t meta_int(const SafeTensors& g, const char* key) {
  return std::stoll(g.metadata.at(key));
}

struct GoldenCase {
  std::string name;
  ExpertsImplKind impl;
};

class GoldenMoE : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(GoldenMoE, ForwardBackwardMatchPyTorch) {
  const auto g = test::load_golden(GetParam().name);
  MoEConfig cfg;
  cfg.n_expert = meta_int(g, "E");
  cfg.n_expert_used = meta_int(g, "K");
  cfg.d_expert = meta_int(g, "F");
  cfg.n_shared_expert = meta_int(g, "n_shared");
  cfg.score = g.metadata.at("score") == "softmax" ? ScoreFunc::kSoftmax : ScoreFunc::kSigmoid;
  cfg.renormalize = meta_int(g, "renormalize") != 0;
  cfg.balance_coef = std::stod(g.metadata.at("balance_coef"));
  cfg.seq_balance_coef = std::stod(g.metadata.at("seq_balance_coef"));
  cfg.z_loss_coef = std::stod(g.metadata.at("z_loss_coef"));
  cfg.experts_impl = GetParam().impl;
  const int64_t B = meta_int(g, "B"), S = meta_int(g, "S"), C = meta_int(g, "C");

  MoELayer layer(cfg, C);
  layer->to(torch::kDouble);
  auto& router = dynamic_cast<TopKRouterImpl&>(*layer->router);
  {
    torch::NoGradGuard ng;
    router.weight.copy_(g.at("w_router"));
    layer->experts->w_gate.copy_(g.at("w_gate"));
    layer->experts->w_up.copy_(g.at("w_up"));
    layer->experts->w_down.copy_(g.at("w_down"));
    if (cfg.n_shared_expert) {
      layer->shared->w_gate.copy_(g.at("shared_w_gate"));
      layer->shared->w_up.copy_(g.at("shared_w_up"));
      layer->shared->w_down.copy_(g.at("shared_w_down"));
    }
  }
  auto x = g.at("x").clone().reshape({B, S, C}).requires_grad_();
  auto out = layer->forward(x);
  EXPECT_TENSOR_NEAR(out.y.reshape({B * S, C}), g.at("y"), kAtol, kRtol);
  EXPECT_TENSOR_NEAR(out.plan.aux_loss, g.at("aux_loss"), kAtol, kRtol);

  auto loss = (out.y.reshape({B * S, C}) * g.at("grad_y")).sum() + out.plan.aux_loss;
  loss.backward();
  EXPECT_TENSOR_NEAR(x.grad().reshape({B * S, C}), g.at("grad_x"), kAtol, kRtol);
  EXPECT_TENSOR_NEAR(router.weight.grad(), g.at("grad_w_router"), kAtol, kRtol);
  EXPECT_TENSOR_NEAR(layer->experts->w_gate.grad(), g.at("grad_w_gate"), kAtol, kRtol);
  EXPECT_TENSOR_NEAR(layer->experts->w_up.grad(), g.at("grad_w_up"), kAtol, kRtol);
  EXPECT_TENSOR_NEAR(layer->experts->w_down.grad(), g.at("grad_w_down"), kAtol, kRtol);
  if (cfg.n_shared_expert) {
    EXPECT_TENSOR_NEAR(layer->shared->w_gate.grad(), g.at("grad_shared_w_gate"), kAtol, kRtol);
    EXPECT_TENSOR_NEAR(layer->shared->w_down.grad(), g.at("grad_shared_w_down"), kAtol, kRtol);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenMoE,
                         ::testing::Values(GoldenCase{"moe_mixtral", ExpertsImplKind::kGrouped},
                                           GoldenCase{"moe_mixtral", ExpertsImplKind::kReference},
                                           GoldenCase{"moe_sigmoid_shared", ExpertsImplKind::kGrouped},
                                           GoldenCase{"moe_sigmoid_shared", ExpertsImplKind::kReference},
                                           GoldenCase{"moe_switch", ExpertsImplKind::kGrouped}),
                         [](const auto& info) { return info.param.name + "_" + to_string(info.param.impl); });

TEST(GoldenAuxLosses, EachTermMatchesPyTorch) {
  for (const char* name : {"moe_mixtral", "moe_sigmoid_shared", "moe_switch"}) {
    SCOPED_TRACE(name);
    const auto g = test::load_golden(name);
    const int64_t B = meta_int(g, "B");
    EXPECT_TENSOR_NEAR(switch_balance_loss(g.at("probs"), g.at("choices")), g.at("balance_loss"), kAtol,
                       kRtol);
    EXPECT_TENSOR_NEAR(seq_balance_loss(g.at("probs"), g.at("choices"), B), g.at("seq_balance_loss"), kAtol,
                       kRtol);
    EXPECT_TENSOR_NEAR(router_z_loss(g.at("logits")), g.at("z_loss"), kAtol, kRtol);
  }
}

}  // namespace
}  // namespace moeforge
