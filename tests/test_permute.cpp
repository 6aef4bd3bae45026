// Invariants of dispatch/combine: permute then unpermute is the identity, for values and gradients.
#include "moeforge/layer/dispatch.h"
#include "moeforge/routing/router.h"
#include "test_util.h"

namespace moeforge {
namespace {

// A plan from random choices; gates are 1/K so that each token's gates sum to one.
RoutingPlan random_plan(int64_t T, int64_t E, int64_t K, torch::Tensor& gate_tk) {
  auto choices = torch::stack({torch::randperm(E).narrow(0, 0, K)}, 0).repeat({T, 1});  // distinct per row
  for (int64_t t = 0; t < T; ++t) choices[t] = torch::randperm(E).narrow(0, 0, K);
  gate_tk = torch::full({T, K}, 1.0 / double(K), torch::kDouble).requires_grad_();
  return build_plan_from_choices(choices, {}, {}, gate_tk, E, 0);
}

TEST(Permute, DispatchThenCombineIsIdentityForValuesAndGradients) {
  torch::manual_seed(3);
  for (int64_t K : {1, 2, 4}) {
    SCOPED_TRACE("K=" + std::to_string(K));
    const int64_t T = 37, C = 5, E = 8;
    torch::Tensor gate_tk;
    auto plan = random_plan(T, E, K, gate_tk);
    ASSERT_EQ(plan.n_assign(), T * K);
    auto x = torch::randn({T, C}, torch::kDouble).requires_grad_();
    auto x_sorted = dispatch(x, plan);  // [N, C]
    // Rows really are permuted into expert order: row i is x[token_index[i]].
    auto off = plan.offsets();
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = off[e]; i < off[e + 1]; ++i)
        ASSERT_TRUE(torch::equal(x_sorted[i], x[plan.token_index[i].item<int64_t>()]));
    auto back = combine(x_sorted, plan, T);
    // Exact up to the rounding of K additions of x/K: 1e-12 for float64.
    EXPECT_TENSOR_NEAR(back, x, 1e-12, 0);
    auto w = torch::randn({T, C}, torch::kDouble);
    (back * w).sum().backward();
    EXPECT_TENSOR_NEAR(x.grad(), w, 1e-12, 0);
  }
}

TEST(Permute, TokensWithoutAssignmentGetZero) {
  // Token 1 asks for nothing (keep = false): it passes through the residual only.
  auto choices = torch::tensor({{0}, {1}, {1}}, torch::kLong);
  auto keep = torch::tensor({{true}, {false}, {true}});
  auto gate = torch::ones({3, 1});
  auto plan = build_plan_from_choices(choices, keep, {}, gate, 2, 0);
  auto x = torch::randn({3, 4});
  auto y = combine(dispatch(x, plan), plan, 3);
  EXPECT_TENSOR_NEAR(y[0], x[0], 0, 0);
  EXPECT_TENSOR_NEAR(y[1], torch::zeros({4}), 0, 0);
  EXPECT_TENSOR_NEAR(y[2], x[2], 0, 0);
}

}  // namespace
}  // namespace moeforge
