#include "moeforge/layer/dispatch.h"

namespace moeforge {

torch::Tensor dispatch(const torch::Tensor& x, const RoutingPlan& plan) {
  return x.index_select(0, plan.token_index);
}

torch::Tensor combine(const torch::Tensor& y_sorted, const RoutingPlan& plan, int64_t n_tokens) {
  auto weighted = y_sorted * plan.gate.to(y_sorted.dtype()).unsqueeze(1);  // [N, C]
  return torch::zeros({n_tokens, y_sorted.size(1)}, y_sorted.options())
      .index_add(0, plan.token_index, weighted);
}

}  // namespace moeforge
