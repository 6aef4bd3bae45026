// A skewed score stream for the balancing tests (loss-free, BIP): the last input feature is 1 and the
// router weight's last column is a fixed per-expert logit offset 0, 0.2, 0.4, ..., so expert E-1 is
// favoured over expert 0 by e^(0.2 (E-1)) before balancing (~4x for E = 8).
#pragma once

#include <torch/torch.h>

#include "moeforge/routing/topk.h"

namespace moeforge::test {

inline void make_skewed(TopKRouterImpl& r) {
  torch::NoGradGuard ng;
  const int64_t E = r.weight.size(0), C = r.weight.size(1);
  r.weight.select(1, C - 1).copy_(torch::arange(E).to(torch::kFloat) * 0.2);
}

// x [T, C] of the stream: Gaussian features, the last one fixed at 1.
inline torch::Tensor skewed_batch(int64_t T, int64_t C) {
  auto x = torch::randn({T, C});
  x.select(1, C - 1).fill_(1.0);
  return x;
}

inline RouteContext train_ctx() {
  RouteContext ctx;
  ctx.training = true;
  return ctx;
}

}  // namespace moeforge::test
