// Token-choice top-K router options against docs/routing.md section 1.
#include "moeforge/routing/topk.h"
#include "test_util.h"

namespace moeforge {
namespace {

MoEConfig base(int64_t E, int64_t K) {
  MoEConfig c;
  c.n_expert = E;
  c.n_expert_used = K;
  return c;
}

TEST(TopK, SelectsHighestScoresAndRenormalises) {
  torch::manual_seed(1);
  auto cfg = base(6, 2);
  TopKRouterImpl r(cfg, 5);
  auto x = torch::randn({40, 5});
  auto plan = r.route(x, {});
  auto probs = torch::softmax(torch::matmul(x, r.weight.t()), 1);
  auto top = std::get<1>(probs.topk(2, 1));
  auto off = plan.offsets();
  ASSERT_EQ(plan.n_assign(), 80);
  // Each token's gates sum to 1 and each assignment is one of its top-2.
  auto per_token = torch::zeros({40}).index_add(0, plan.token_index, plan.gate.detach());
  EXPECT_TENSOR_NEAR(per_token, torch::ones({40}), 1e-6, 0);  // float32 sum of two values
  for (int64_t e = 0; e < 6; ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      const int64_t t = plan.token_index[i].item<int64_t>();
      EXPECT_TRUE((top[t] == e).any().item<bool>());
    }
}

TEST(TopK, WithoutRenormalisationGateIsTheProbability) {
  torch::manual_seed(2);
  auto cfg = base(4, 1);
  cfg.renormalize = false;
  TopKRouterImpl r(cfg, 3);
  auto x = torch::randn({10, 3});
  auto plan = r.route(x, {});
  auto probs = torch::softmax(torch::matmul(x, r.weight.t()), 1);
  auto expect = std::get<0>(probs.max(1)).index_select(0, plan.token_index);
  EXPECT_TENSOR_NEAR(plan.gate, expect, 1e-7, 1e-6);  // the same float32 softmax
}

TEST(TopK, SigmoidGatesAreAlwaysRenormalised) {
  torch::manual_seed(3);
  auto cfg = base(8, 3);
  cfg.score = ScoreFunc::kSigmoid;
  cfg.renormalize = false;  // ignored for sigmoid (DeepSeek-V3)
  TopKRouterImpl r(cfg, 4);
  auto x = torch::randn({12, 4});
  auto plan = r.route(x, {});
  auto per_token = torch::zeros({12}).index_add(0, plan.token_index, plan.gate.detach());
  EXPECT_TENSOR_NEAR(per_token, torch::ones({12}), 1e-6, 0);
}

TEST(TopK, NoiseOnlyInTraining) {
  torch::manual_seed(4);
  auto cfg = base(8, 2);
  cfg.noisy = true;
  TopKRouterImpl r(cfg, 6);
  {
    torch::NoGradGuard ng;
    r.noise_weight.fill_(0.5);  // softplus(x W_noise) > 0: real noise
  }
  auto x = torch::randn({200, 6});
  auto eval_a = r.route(x, {});
  auto eval_b = r.route(x, {});
  EXPECT_TRUE(torch::equal(eval_a.token_index, eval_b.token_index));  // deterministic in evaluation
  RouteContext train;
  train.training = true;
  auto noisy = r.route(x, train);
  EXPECT_FALSE(torch::equal(noisy.token_index, eval_a.token_index) &&
               noisy.offsets() == eval_a.offsets());  // noise moved some choices
  // The noise projection learns: it gets a gradient through the gates.
  (noisy.gate.sum() + noisy.aux_loss).backward();
  ASSERT_TRUE(r.noise_weight.grad().defined());
  EXPECT_GT(r.noise_weight.grad().abs().sum().item<double>(), 0.0);
}

TEST(TopK, BalanceLossUsesTheFullSoftmax) {
  // With uniform logits the balance loss is exactly 1 (E * sum f_e / E) whatever the choices, and its
  // gradient with respect to the router is non-zero when loads are unequal.
  auto cfg = base(4, 1);
  cfg.z_loss_coef = 0;
  cfg.balance_coef = 1.0;
  TopKRouterImpl r(cfg, 2);
  {
    torch::NoGradGuard ng;
    r.weight.zero_();
    r.weight[0][0] = 1.0;
  }
  auto x = torch::zeros({8, 2});
  x.select(1, 0).fill_(1.0);  // every token prefers expert 0
  auto plan = r.route(x, {});
  plan.aux_loss.backward();
  EXPECT_GT(plan.aux_loss.item<double>(), 1.0);  // all load on the most probable expert
  EXPECT_GT(r.weight.grad().abs().sum().item<double>(), 0.0);
}

TEST(TopK, AuxLossIsSkippedOnlyInInference) {
  auto cfg = base(4, 1);
  cfg.balance_coef = 1.0;
  TopKRouterImpl r(cfg, 2);
  auto x = torch::randn({8, 2});
  torch::NoGradGuard ng;
  EXPECT_EQ(r.route(x, {}).aux_loss.item<double>(), 0.0);  // not training, no autograd: not computed
  RouteContext training;
  training.training = true;
  EXPECT_GT(r.route(x, training).aux_loss.item<double>(),
            0.0);  // a training step under no_grad still reports it
}

}  // namespace
}  // namespace moeforge
