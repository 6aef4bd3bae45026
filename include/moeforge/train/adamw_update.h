// One parameter's AdamW update, fused (one pass over p, g, m, v: kernels/cpu/adamw.cpp) or as its plain
// twin in LibTorch tensor ops (docs/performance.md, "Fused AdamW"). AdamW::step (optim.h) uses the fused one
// for float CPU tensors.
#pragma once

#include <torch/torch.h>

namespace moeforge {

struct AdamWScalars {
  double lr, beta1, beta2, eps, weight_decay, bc1, bc2;  // bc = 1 - beta^t
};

// Decoupled decay on matrices only (p.dim() >= 2). No-op without a gradient.
void adamw_update(torch::Tensor& p, torch::Tensor& m, torch::Tensor& v, const AdamWScalars& s, bool fused);

}  // namespace moeforge
