// Measures of docs/routing.md section 9: MaxVio accumulation, specialisation, the GLPK optimum and the gap.
#include "moeforge/routing/measures.h"
#include "moeforge/routing/topk.h"
#include "test_util.h"

namespace moeforge {
namespace {

TEST(Measures, MaxVioBatchAndGlobal) {
  MaxVioAccumulator acc(2, 2);
  acc.add(0, {3, 1});  // MaxVio 0.5
  acc.add(0, {1, 3});  // MaxVio 0.5; summed load {4, 4}: global 0
  acc.add(1, {2, 2});  // 0
  // Ratios of small integers: exact up to one float64 rounding.
  EXPECT_NEAR(acc.batch(0), 0.5, 1e-12);
  EXPECT_NEAR(acc.global(0), 0.0, 1e-12);
  EXPECT_NEAR(acc.batch(1), 0.0, 1e-12);
  EXPECT_NEAR(acc.batch_mean(), 0.25, 1e-12);
  EXPECT_NEAR(acc.global_mean(), 0.0, 1e-12);
  EXPECT_EQ(acc.n_batches(0), 2);
}

TEST(Measures, SpecialisationExtremes) {
  // float64 logs of small counts: 1e-12.
  auto diag = torch::tensor({{10, 0, 0}, {0, 10, 0}, {0, 0, 10}}, torch::kLong);
  auto sp = domain_specialisation(diag);
  EXPECT_NEAR(sp.mi_over_h, 1.0, 1e-12);
  for (double p : sp.purity) EXPECT_NEAR(p, 1.0, 1e-12);
  auto flat = torch::full({3, 3}, 7, torch::kLong);  // expert independent of domain
  sp = domain_specialisation(flat);
  EXPECT_NEAR(sp.mi_over_h, 0.0, 1e-12);
  for (double p : sp.purity) EXPECT_NEAR(p, 1.0 / 3, 1e-12);
  // add_domain_counts from a plan: tokens 0,1 (domain 0) -> expert 0; token 2 (domain 1) -> expert 1.
  RoutingPlan plan;
  plan.token_index = torch::tensor({0, 1, 2}, torch::kLong);
  plan.expert_offsets = torch::tensor({0, 2, 3}, torch::kLong);
  auto counts = torch::zeros({2, 2}, torch::kLong);
  add_domain_counts(counts, plan, torch::tensor({0, 0, 1}, torch::kLong));
  EXPECT_TRUE(torch::equal(counts, torch::tensor({{2, 0}, {0, 1}}, torch::kLong)));
}

TEST(Measures, GlpkOptimumMatchesBruteForce) {
  torch::manual_seed(50);
  // T = 5 tokens, E = 3 experts, K = 1, cap = 2: 3^5 = 243 assignments to enumerate.
  for (int trial = 0; trial < 5; ++trial) {
    auto s = torch::rand({5, 3}, torch::kDouble);
    auto opt = solve_balanced_assignment(s, 1, 2);
    double best = -1;
    for (int code = 0; code < 243; ++code) {
      int c = code, load[3] = {0, 0, 0};
      double obj = 0;
      for (int t = 0; t < 5; ++t, c /= 3) {
        ++load[c % 3];
        obj += s[t][c % 3].item<double>();
      }
      if (load[0] <= 2 && load[1] <= 2 && load[2] <= 2) best = std::max(best, obj);
    }
    EXPECT_NEAR(opt.objective, best, 1e-9);  // float64 simplex vs direct sums
    EXPECT_TRUE(torch::equal(opt.x.sum(1), torch::ones({5}, torch::kDouble)));
    EXPECT_LE(opt.x.sum(0).max().item<double>(), 2.0);
  }
}

TEST(Measures, OptimalityGapOfPlainTopK) {
  torch::manual_seed(51);
  MoEConfig cfg;
  cfg.n_expert = 4;
  cfg.n_expert_used = 1;
  TopKRouterImpl r(cfg, 4);
  {
    torch::NoGradGuard ng;
    // x[:, 0] = 1 below: a logit offset of 5 for expert 3, so unconstrained top-1 overfills it.
    r.weight.select(1, 0).zero_();
    r.weight[3][0] = 5.0;
  }
  auto x = torch::randn({16, 4});
  x.select(1, 0).fill_(1.0);
  auto plan = r.route(x, {});
  auto s = torch::softmax(torch::matmul(x, r.weight.t()), 1);
  auto g = optimality_gap(s, plan, 1, 4);
  // Top-1 takes each token's best expert: it beats the capacity-constrained optimum and overfills.
  EXPECT_LT(g.gap, 0.0);
  EXPECT_GT(g.capacity_violation, 0.5);
  // The optimum itself has gap 0 and no violation.
  auto opt = solve_balanced_assignment(s, 1, 4);
  auto choice = std::get<1>(opt.x.max(1, true));  // [T, 1]
  auto own = build_plan_from_choices(choice, {}, {}, s.gather(1, choice), 4, 0);
  auto g0 = optimality_gap(s, own, 1, 4);
  EXPECT_NEAR(g0.gap, 0.0, 1e-6);  // float32 scores summed in float64
  EXPECT_EQ(g0.capacity_violation, 0.0);
}

}  // namespace
}  // namespace moeforge
