// Routing measures (docs/routing.md section 9) on hand-computed loads.
#include "moeforge/routing/router.h"
#include "moeforge/routing/stats.h"
#include "test_util.h"

namespace moeforge {
namespace {

TEST(Stats, HandComputedLoads) {
  // load = [6, 2, 0, 4]: mean 3, max 6 -> MaxVio = 1; one dead expert; 12 kept of 16 requested.
  auto s = make_routing_stats({6, 2, 0, 4}, 8, 16);
  EXPECT_DOUBLE_EQ(s.max_vio, 1.0);
  EXPECT_EQ(s.dead_experts, 1);
  EXPECT_EQ(s.n_kept, 12);
  EXPECT_DOUBLE_EQ(s.dropped_share, 0.25);
  // std = sqrt(((3)^2 + 1 + 9 + 1) / 4) = sqrt(5); cv = sqrt(5) / 3.
  EXPECT_NEAR(s.load_cv, std::sqrt(5.0) / 3.0, 1e-12);
  const double h = -(0.5 * std::log(0.5) + (1.0 / 6) * std::log(1.0 / 6) + (1.0 / 3) * std::log(1.0 / 3));
  EXPECT_NEAR(s.load_entropy, h / std::log(4.0), 1e-12);
}

// Tokens given no expert: 6 tokens, experts took {0, 2}, {2, 5}, {0}: tokens 1, 3 and 4 have none.
TEST(Stats, UnroutedTokensAreThoseNoExpertKept) {
  RoutingPlan plan;
  plan.token_index = torch::tensor({0, 2, 2, 5, 0}, torch::kLong);
  plan.expert_offsets = torch::tensor({0, 2, 4, 5}, torch::kLong);
  EXPECT_EQ(plan.unrouted_tokens(6), 3);
  EXPECT_EQ(plan.unrouted_tokens(3), 1);  // of the first 3 tokens only token 1 (token 5 is not counted)
  plan.token_index = torch::arange(6, torch::kLong);
  EXPECT_EQ(plan.unrouted_tokens(6), 0);
  EXPECT_EQ(plan.unrouted_tokens(0), 0);
}

TEST(Stats, PerfectBalance) {
  auto s = make_routing_stats({5, 5, 5, 5}, 10, 20);
  EXPECT_DOUBLE_EQ(s.max_vio, 0.0);
  EXPECT_DOUBLE_EQ(s.load_cv, 0.0);
  EXPECT_NEAR(s.load_entropy, 1.0, 1e-12);
  EXPECT_EQ(s.dead_experts, 0);
  EXPECT_DOUBLE_EQ(s.dropped_share, 0.0);
}

TEST(Stats, EmptyLoadIsNotADivisionByZero) {
  auto s = make_routing_stats({0, 0}, 0, 0);
  EXPECT_DOUBLE_EQ(s.max_vio, 0.0);
  EXPECT_DOUBLE_EQ(s.dropped_share, 0.0);
  EXPECT_EQ(s.dead_experts, 2);
}

}  // namespace
}  // namespace moeforge
