// Loss-free balancing against docs/routing.md section 3: the bias balances a skewed stream and never uses the
// batch it routes.
#include "moeforge/routing/loss_free.h"
#include "skewed_stream.h"
#include "test_util.h"

namespace moeforge {
namespace {

constexpr int64_t kC = 16, kE = 8, kK = 2;

MoEConfig lf_config(ScoreFunc score = ScoreFunc::kSoftmax) {
  MoEConfig c;
  c.router = "loss_free";
  c.n_expert = kE;
  c.n_expert_used = kK;
  c.score = score;
  return c;
}

using test::make_skewed;
using test::train_ctx;
torch::Tensor skewed_batch(int64_t T) {
  return test::skewed_batch(T, kC);
}

TEST(LossFree, MaxVioFallsBelowPointOneOnASkewedStream) {
  for (auto score : {ScoreFunc::kSoftmax, ScoreFunc::kSigmoid}) {
    torch::manual_seed(30);
    LossFreeRouterImpl r(lf_config(score), kC);
    make_skewed(r);
    const int kSteps = 400;
    std::vector<double> vio;
    for (int step = 0; step < kSteps; ++step) {
      auto plan = r.route(skewed_batch(4096), train_ctx());
      vio.push_back(plan.stats.max_vio);
      r.after_step(test::feedback_of(plan));
    }
    int first = -1;
    for (int i = 0; i < kSteps && first < 0; ++i)
      if (vio[i] < 0.1) first = i;
    double tail_max = 0, tail_mean = 0;
    for (int i = kSteps - 50; i < kSteps; ++i)
      tail_max = std::max(tail_max, vio[i]), tail_mean += vio[i] / 50;
    std::cout << to_string(score) << ": MaxVio step 0 " << vio[0] << ", first < 0.1 at step " << first
              << ", last 50 steps: mean " << tail_mean << ", max " << tail_max << "\n";
    EXPECT_GT(vio[0], 0.5);  // the stream is really skewed before balancing
    // u = 1e-3 moves b by at most 0.001 per step; the offsets need ~0.1 of bias: within 300 steps.
    EXPECT_GE(first, 0);
    EXPECT_LT(first, 300);
    // It stays balanced: the mean of the last 50 steps. Single 4096-token batches still fluctuate by
    // sampling noise (a load of ~1024 has a binomial std ~3%, the max of 8 experts ~2 std).
    EXPECT_LT(tail_mean, 0.1);
  }
}

TEST(LossFree, BiasNeverUsesTheBatchItRoutes) {
  torch::manual_seed(31);
  LossFreeRouterImpl r(lf_config(), kC);
  make_skewed(r);
  for (int step = 0; step < 20; ++step)
    r.after_step(test::feedback_of(r.route(skewed_batch(512), train_ctx())));
  auto b0 = r.bias.clone();
  ASSERT_GT(b0.abs().sum().item<double>(), 0.0);
  auto x = skewed_batch(512);
  auto plan = r.route(x, train_ctx());
  EXPECT_TRUE(torch::equal(r.bias, b0));  // routing does not touch the bias
  // The plan is the top-K of (s + b0): the bias of the previous steps only.
  auto expect = r.route_scores(r.score(x, false), b0, train_ctx());
  EXPECT_TRUE(torch::equal(plan.token_index, expect.token_index));
  EXPECT_EQ(plan.offsets(), expect.offsets());
  // after_step: b_e += u sign(mean(c) - c_e), with the load of that batch.
  r.after_step(test::feedback_of(plan));
  const double mean = 512.0 * kK / kE;
  for (int64_t e = 0; e < kE; ++e) {
    const double d = mean - double(plan.stats.load[e]);
    const double sign = d > 0 ? 1 : (d < 0 ? -1 : 0);
    // float32 bias of magnitude <= 0.02: one rounding of 0.02 * 2^-24
    EXPECT_NEAR(r.bias[e].item<double>(), b0[e].item<double>() + 1e-3 * sign, 1e-8) << "expert " << e;
  }
}

TEST(LossFree, GatesComeFromScoresAlone) {
  torch::manual_seed(32);
  auto cfg = lf_config(ScoreFunc::kSigmoid);
  LossFreeRouterImpl r(cfg, kC);
  {
    torch::NoGradGuard ng;
    r.bias.copy_(torch::linspace(-0.5, 0.5, kE));
  }
  auto x = torch::randn({64, kC});
  auto plan = r.route(x, {});
  auto s = torch::sigmoid(torch::matmul(x, r.weight.t()));  // [T, E]
  auto off = plan.offsets();
  auto sel = torch::zeros({64}, torch::kDouble);  // per token: sum of its selected s
  for (int64_t e = 0; e < kE; ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i)
      sel[plan.token_index[i].item<int64_t>()] += s[plan.token_index[i]][e].item<double>();
  for (int64_t e = 0; e < kE; ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      const int64_t t = plan.token_index[i].item<int64_t>();
      // sigmoid gates renormalised over the selected s (not s + b); float32 division
      EXPECT_NEAR(plan.gate[i].item<double>(), s[t][e].item<double>() / sel[t].item<double>(), 1e-6);
    }
  EXPECT_EQ(plan.aux_loss.item<double>() > 0, true);  // the z-loss stays
}

}  // namespace
}  // namespace moeforge
