// Adapter experts on a frozen dense FFN (MoCE / PESC form, docs/routing.md section 6).
#include "moeforge/layer/moe_layer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

MoEConfig adapter_config(const std::string& router) {
  MoEConfig c;
  c.router = router;
  c.n_expert = 8;
  c.n_cluster = 2;
  c.n_expert_used = 2;
  c.d_expert = 24;
  c.expert_form = ExpertForm::kAdapter;
  c.adapter_dim = 6;
  c.adapter_scale = 0.5;
  return c;
}

class AdapterExpertsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(AdapterExpertsTest, ZeroUpProjectionGivesTheFrozenFFNOutput) {
  torch::manual_seed(21);
  MoELayer layer(adapter_config(GetParam()), 10);
  EXPECT_EQ(layer->adapters->w_up.abs().max().item<double>(), 0.0);  // the PESC initialisation
  auto x = torch::randn({3, 7, 10});
  torch::NoGradGuard ng;
  auto y = layer->forward(x).y;
  // z + sum g * 0: exactly the dense output, no rounding involved.
  EXPECT_TENSOR_NEAR(y, layer->dense->forward(x.reshape({21, 10})).reshape({3, 7, 10}), 0, 0);
}

TEST_P(AdapterExpertsTest, OutputIsFFNPlusGatedAdaptersOfFFN) {
  torch::manual_seed(22);
  auto cfg = adapter_config(GetParam());
  MoELayer layer(cfg, 10);
  {
    torch::NoGradGuard ng;
    layer->adapters->w_up.normal_();
  }
  auto x = torch::randn({12, 10});
  torch::NoGradGuard ng;
  auto out = layer->forward(x);
  // Hand computation, one assignment at a time: y_t = z_t + sum g * lambda W_up gelu(W_down z_t).
  auto z = layer->dense->forward(x);  // [T, C]
  auto want = z.clone();
  const auto off = out.plan.offsets();
  for (int64_t e = 0; e < 8; ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      const int64_t t = out.plan.token_index[i].item<int64_t>();
      auto a =
          0.5 * torch::mv(layer->adapters->w_up[e], torch::gelu(torch::mv(layer->adapters->w_down[e], z[t])));
      want[t] += out.plan.gate[i] * a;
    }
  EXPECT_TENSOR_NEAR(out.y, want, 1e-5, 1e-5);  // float32, different summation order
}

TEST_P(AdapterExpertsTest, GradientsReachAdaptersAndRouterButNotTheFrozenFFN) {
  torch::manual_seed(23);
  MoELayer layer(adapter_config(GetParam()), 10);
  {
    torch::NoGradGuard ng;
    layer->adapters->w_up.normal_();  // at W_up = 0 the router's gradient is zero by construction
  }
  layer->train();
  RouteContext ctx;
  if (GetParam() == "moce")
    ctx.cache = test::moce_given_seq_clusters(torch::tensor({0, 1, 1, 0}, torch::kLong));  // G = 2
  auto out = layer->forward(torch::randn({4, 6, 10}), ctx);
  (out.y.pow(2).mean() + out.plan.aux_loss).backward();
  for (const auto& p : layer->dense->named_parameters()) {
    EXPECT_FALSE(p.value().requires_grad()) << p.key();
    EXPECT_FALSE(p.value().grad().defined()) << p.key();
  }
  EXPECT_GT(layer->adapters->w_up.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(layer->adapters->w_down.grad().abs().sum().item<double>(), 0);
  double router_grad = 0;
  for (const auto& p : layer->router->parameters())
    if (p.grad().defined()) router_grad += p.grad().abs().sum().item<double>();
  EXPECT_GT(router_grad, 0);
  // The frozen FFN is still in named_parameters(), so a checkpoint keeps it.
  EXPECT_TRUE(layer->named_parameters().contains("dense.w_up"));
}

TEST_P(AdapterExpertsTest, StateRoundTripGivesSameOutputs) {
  torch::manual_seed(24);
  auto cfg = adapter_config(GetParam());
  MoELayer a(cfg, 10), b(cfg, 10);
  torch::NoGradGuard ng;
  a->adapters->w_up.normal_();
  auto pb = b->named_parameters(), bb = b->named_buffers();
  for (const auto& p : a->named_parameters()) pb[p.key()].copy_(p.value());
  for (const auto& p : a->named_buffers()) bb[p.key()].copy_(p.value());
  a->eval();
  b->eval();
  auto x = torch::randn({2, 5, 10});
  EXPECT_TENSOR_NEAR(b->forward(x).y, a->forward(x).y, 0, 0);  // same weights, same ops: bit-identical
}

INSTANTIATE_TEST_SUITE_P(Routers, AdapterExpertsTest, ::testing::Values("topk", "hierarchical", "moce"));

TEST(AdapterExperts, BadConfigNamesTheField) {
  auto c = adapter_config("topk");
  c.adapter_dim = 0;
  try {
    c.validate();  // validated where a config is read (docs/architecture.md, "Config sections")
    ADD_FAILURE() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "moe.adapter_dim") << e.what();
    EXPECT_NE(std::string(e.what()).find("moe.adapter_dim"), std::string::npos);
  }
}

}  // namespace
}  // namespace moeforge
