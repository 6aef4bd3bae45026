// Capacity and dropping: hand-worked cases for each overflow rule of docs/routing.md section 1.
#include "moeforge/routing/router.h"
#include "moeforge/routing/topk.h"
#include "test_util.h"

namespace moeforge {
namespace {

std::vector<int64_t> vec(const torch::Tensor& t) {
  auto c = t.to(torch::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

TEST(Capacity, FormulaIsCeilOfCFTimesTKOverE) {
  EXPECT_EQ(expert_capacity(1.0, 8, 2, 4), 4);    // 1.0 * 16 / 4
  EXPECT_EQ(expert_capacity(1.25, 10, 1, 4), 4);  // ceil(3.125)
  EXPECT_EQ(expert_capacity(0.5, 3, 1, 2), 1);    // ceil(0.75)
  EXPECT_EQ(expert_capacity(0.0, 100, 2, 4), 0);  // dropless
}

// Four tokens, K = 2, two experts, capacity 2.
//   token: first choice, second choice
//   t0: e0, e1      t1: e0, e1      t2: e0, e1      t3: e1, e0
// First choices are served before second choices.
TEST(Capacity, FirstChoicesBeforeSecondChoicesInTokenOrder) {
  auto choices = torch::tensor({{0, 1}, {0, 1}, {0, 1}, {1, 0}}, torch::kLong);
  auto gate = torch::ones({4, 2});
  auto plan = build_plan_from_choices(choices, {}, {}, gate, 2, /*capacity=*/2);
  // Rank 0: e0 takes t0, t1 (full, t2 dropped); e1 takes t3. Rank 1: e1 takes t0 (now full); the rest drop.
  EXPECT_EQ(plan.offsets(), (std::vector<int64_t>{0, 2, 4}));
  EXPECT_EQ(vec(plan.token_index), (std::vector<int64_t>{0, 1, 0, 3}));
  EXPECT_EQ(plan.stats.n_requested, 8);
  EXPECT_EQ(plan.stats.n_kept, 4);
  EXPECT_DOUBLE_EQ(plan.stats.dropped_share, 0.5);
  EXPECT_EQ(plan.stats.load, (std::vector<int64_t>{2, 2}));
}

TEST(Capacity, BatchPrioritisedServesHighScoresFirst) {
  // One expert, K = 1, capacity 2: token order would keep t0, t1; priority keeps the two highest (t2, t3).
  auto choices = torch::zeros({4, 1}, torch::kLong);
  auto gate = torch::ones({4, 1});
  auto priority = torch::tensor({0.1f, 0.2f, 0.9f, 0.5f});
  auto plan_order = build_plan_from_choices(choices, {}, {}, gate, 1, 2);
  EXPECT_EQ(vec(plan_order.token_index), (std::vector<int64_t>{0, 1}));
  auto plan_bpr = build_plan_from_choices(choices, {}, priority, gate, 1, 2);
  // Kept assignments are listed in token order inside the expert.
  EXPECT_EQ(vec(plan_bpr.token_index), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(plan_bpr.stats.n_kept, 2);
}

TEST(Capacity, BatchPrioritisedStillServesFirstChoicesFirst) {
  // t1 has the highest priority but its first choice is e1; its second choice (e0) must not displace the
  // first choice of the low-priority t0.
  auto choices = torch::tensor({{0, 1}, {1, 0}}, torch::kLong);
  auto gate = torch::ones({2, 2});
  auto priority = torch::tensor({0.1f, 0.9f});
  auto plan = build_plan_from_choices(choices, {}, priority, gate, 2, 1);
  EXPECT_EQ(plan.offsets(), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(vec(plan.token_index), (std::vector<int64_t>{0, 1}));
}

TEST(Capacity, DroplessKeepsEverythingAndGroupsByExpert) {
  auto choices = torch::tensor({{2, 0}, {2, 1}, {2, 0}}, torch::kLong);
  auto gate = torch::ones({3, 2});
  auto plan = build_plan_from_choices(choices, {}, {}, gate, 3, 0);
  EXPECT_EQ(plan.offsets(), (std::vector<int64_t>{0, 2, 3, 6}));
  EXPECT_EQ(vec(plan.token_index), (std::vector<int64_t>{0, 2, 1, 0, 1, 2}));
  EXPECT_EQ(plan.stats.dropped_share, 0.0);
}

TEST(Capacity, RouterDropsWithCapacityFactor) {
  // All tokens prefer expert 0 (its router row dominates); CF = 1 gives cap = T*K/E per expert.
  MoEConfig cfg;
  cfg.n_expert = 4;
  cfg.n_expert_used = 1;
  cfg.capacity_factor = 1.0;
  TopKRouterImpl router(cfg, 3);
  {
    torch::NoGradGuard ng;
    router.weight.zero_();
    router.weight[0][0] = 10;  // x[:,0] = 1 below: expert 0 has logit 10, others 0
  }
  auto x = torch::zeros({8, 3});
  x.select(1, 0).fill_(1);
  auto plan = router.route(x, {});
  EXPECT_EQ(plan.stats.load, (std::vector<int64_t>{2, 0, 0, 0}));  // cap = 1 * 8 / 4
  EXPECT_EQ(vec(plan.token_index), (std::vector<int64_t>{0, 1}));  // token order
  EXPECT_DOUBLE_EQ(plan.stats.dropped_share, 0.75);
}

TEST(Capacity, GShardRandomSecondKeepsSecondWithProbabilityTwiceItsWeight) {
  // g2 / (g1 + g2) = 0.25 for every token: the second expert is kept with probability 2 * 0.25 = 0.5.
  MoEConfig cfg;
  cfg.n_expert = 2;
  cfg.n_expert_used = 2;
  cfg.gshard_random_second = true;
  TopKRouterImpl router(cfg, 1);
  {
    torch::NoGradGuard ng;
    router.weight.copy_(torch::tensor({{std::log(3.0)}, {0.0}}));  // softmax = [0.75, 0.25]
  }
  torch::manual_seed(0);
  const int64_t T = 20000;
  auto x = torch::ones({T, 1});
  RouteContext ctx;
  ctx.training = true;
  auto plan = router.route(x, ctx);
  const double kept_second = double(plan.stats.load[1]) / double(T);
  // Binomial(20000, 0.5): standard deviation 0.0035; 0.02 is over 5 sigma.
  EXPECT_NEAR(kept_second, 0.5, 0.02);
  EXPECT_EQ(plan.stats.load[0], T);
  // Not in evaluation: both experts always.
  auto plan_eval = router.route(x, {});
  EXPECT_EQ(plan_eval.stats.load[1], T);
}

}  // namespace
}  // namespace moeforge
