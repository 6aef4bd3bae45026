// Stages 2 and 4 of the MoE layer: dispatch (gather rows into expert order) and combine (weighted
// scatter-add back to token order). Legend: T tokens, C width, N assignments.
#pragma once

#include <torch/torch.h>

#include "moeforge/routing/router.h"

namespace moeforge {

// x [T, C] -> x_sorted [N, C], row i = x[plan.token_index[i]].
torch::Tensor dispatch(const torch::Tensor& x, const RoutingPlan& plan);

// y_sorted [N, C] -> y [T, C], y[t] = sum over assignments i of t of gate[i] * y_sorted[i].
// Tokens with no assignment get zero (the residual carries them).
torch::Tensor combine(const torch::Tensor& y_sorted, const RoutingPlan& plan, int64_t n_tokens);

}  // namespace moeforge
