// Every router of the family through MoELayer: forward/backward, state round trip, bad configs.
#include "moeforge/config/binder.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/routing/moe_config.h"
#include "moeforge/routing/registry.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

struct Variant {
  const char* label;
  MoEConfig cfg;
};

std::vector<Variant> variants() {
  auto make = [](const char* router) {
    MoEConfig c;
    c.router = router;
    c.n_expert = 8;
    c.n_expert_used = 2;
    c.d_expert = 16;
    return c;
  };
  std::vector<Variant> v;
  v.push_back({"topk", make("topk")});
  for (auto mode : {ECMode::kCausal, ECMode::kNonCausal, ECMode::kThreshold}) {
    auto c = make("expert_choice");
    c.expert_choice.mode = mode;
    v.push_back({"expert_choice", c});
  }
  v.push_back({"loss_free", make("loss_free")});
  auto lf_sig = make("loss_free");
  lf_sig.score = ScoreFunc::kSigmoid;
  v.push_back({"loss_free(sigmoid)", lf_sig});
  v.push_back({"bip", make("bip")});
  auto solve = make("bip");
  solve.bip.mode = BipMode::kSolve;
  v.push_back({"bip(solve)", solve});
  return v;
}

// A few training steps with after_step, so that the router state (bias, q, thresholds) is non-trivial.
void train_steps(MoELayer& layer, int n) {
  torch::optim::SGD opt(layer->parameters(), 0.05);
  layer->train();
  for (int i = 0; i < n; ++i) {
    auto out = layer->forward(torch::randn({4, 16, 12}));
    auto loss = out.y.pow(2).mean() + out.plan.aux_loss;
    opt.zero_grad();
    loss.backward();
    opt.step();
    layer->after_step();
  }
}

TEST(RouterFamily, ForwardBackwardThroughTheLayer) {
  for (auto& v : variants()) {
    SCOPED_TRACE(v.label);
    torch::manual_seed(60);
    MoELayer layer(v.cfg, 12);
    layer->train();
    auto x = torch::randn({4, 16, 12}, torch::requires_grad());
    auto out = layer->forward(x);
    ASSERT_EQ(out.y.sizes(), x.sizes());
    (out.y.pow(2).mean() + out.plan.aux_loss).backward();
    auto g = layer->router->named_parameters()["weight"].grad();
    ASSERT_TRUE(g.defined());
    EXPECT_TRUE(torch::isfinite(g).all().item<bool>());
    EXPECT_GT(g.abs().sum().item<double>(), 0.0);  // the router learns through its gates
    EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
    EXPECT_NE(layer->router->name(), "");
  }
}

TEST(RouterFamily, StateRoundTripThroughNamedParametersAndBuffers) {
  for (auto& v : variants()) {
    SCOPED_TRACE(v.label);
    torch::manual_seed(61);
    MoELayer a(v.cfg, 12);
    train_steps(a, 5);
    torch::manual_seed(62);
    MoELayer b(v.cfg, 12);
    // What a checkpoint saves: named_parameters() and named_buffers(), by name.
    {
      torch::NoGradGuard ng;
      auto pb = b->named_parameters();
      for (auto& kv : a->named_parameters()) pb[kv.key()].copy_(kv.value());
      auto bb = b->named_buffers();
      size_t n_buffers = 0;
      for (auto& kv : a->named_buffers()) {
        bb[kv.key()].copy_(kv.value());
        ++n_buffers;
      }
      if (v.cfg.router != "topk") {
        EXPECT_GT(n_buffers, 0u);  // the router state is a buffer
      }
    }
    auto x = torch::randn({4, 16, 12});
    for (bool training : {false, true}) {
      a->train(training);
      b->train(training);
      // Same parameters, same state, same input: bitwise the same computation.
      EXPECT_TENSOR_NEAR(b->forward(x).y, a->forward(x).y, 0, 0);
    }
  }
}

using ::moeforge::test::expect_config_error;

TEST(RouterFamily, BadConfigNamesTheField) {
  auto with = [](const char* router, auto change) {
    MoEConfig c;
    c.router = router;
    change(c);
    return [c] { c.validate(); };  // validated where a config is read (docs/architecture.md)
  };
  expect_config_error(with("expert_choice", [](MoEConfig& c) { c.expert_choice.capacity_factor = 0; }),
                      "moe.ec_capacity_factor");
  expect_config_error(with("expert_choice", [](MoEConfig& c) { c.expert_choice.capacity_factor = 9; }),
                      "moe.ec_capacity_factor");  // > E
  expect_config_error(with("expert_choice", [](MoEConfig& c) { c.score = ScoreFunc::kSigmoid; }),
                      "moe.score");
  expect_config_error(with("expert_choice", [](MoEConfig& c) { c.expert_choice.threshold_decay = 1.0; }),
                      "moe.ec_threshold_decay");
  expect_config_error(with("loss_free", [](MoEConfig& c) { c.loss_free.bias_update_rate = -1e-3; }),
                      "moe.bias_update_rate");
  expect_config_error(with("bip", [](MoEConfig& c) { c.bip.iters = 0; }), "moe.bip_iters");
  expect_config_error(with("bip", [](MoEConfig& c) { c.n_expert_used = 9; }), "moe.n_expert_used");
  for (const char* r : {"expert_choice", "loss_free", "bip"}) {
    const auto all = router_names();
    EXPECT_NE(std::find(all.begin(), all.end(), r), all.end()) << r;
  }
}

TEST(RouterFamily, KeysBindFromToml) {
  MoEConfig c;
  ConfigBinder b;
  bind_moe_config(b, &c);
  b.apply_text(
      "[moe]\nrouter = \"expert_choice\"\nec_mode = \"noncausal\"\nec_eval = \"batch\"\n"
      "ec_capacity_factor = 1.5\nec_threshold_decay = 0.9\nbias_update_rate = 0.01\n"
      "bip_iters = 4\nbip_mode = \"solve\"\n",
      "t.toml");
  EXPECT_EQ(c.router, "expert_choice");
  EXPECT_EQ(c.expert_choice.mode, ECMode::kNonCausal);
  EXPECT_EQ(c.expert_choice.eval, ECEval::kBatch);
  EXPECT_DOUBLE_EQ(c.expert_choice.capacity_factor, 1.5);
  EXPECT_DOUBLE_EQ(c.expert_choice.threshold_decay, 0.9);
  EXPECT_DOUBLE_EQ(c.loss_free.bias_update_rate, 0.01);
  EXPECT_EQ(c.bip.iters, 4);
  EXPECT_EQ(c.bip.mode, BipMode::kSolve);
  expect_config_error([&] { b.apply_override("moe.ec_mode=sideways"); }, "moe.ec_mode");
}

}  // namespace
}  // namespace moeforge
