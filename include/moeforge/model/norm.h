// RMSNorm, y = x / sqrt(mean(x^2) + eps) * w over the last dimension, in two implementations with the same
// function (docs/performance.md, "Fused RMSNorm"): a fused CPU forward and backward (kernels/cpu/rmsnorm.cpp;
// one pass each way, keeping only 1 / rms per row) and its plain twin in LibTorch ops with autograd's
// backward.
#pragma once

#include <torch/torch.h>

namespace moeforge {

// x [..., C], w [C]. The fused path for float CPU tensors, the reference otherwise.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor rms_norm_reference(const torch::Tensor& x, const torch::Tensor& w, double eps);

}  // namespace moeforge
