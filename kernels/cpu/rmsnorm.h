// RMSNorm over rows, forward and backward, on raw row-major float arrays (docs/performance.md, "Fused
// RMSNorm"): y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) per row of width C.
#pragma once

#include <cstdint>

namespace moeforge::kernels::cpu {

// x, y [n, C]; w [C]; r [n] gets each row's 1 / rms (kept for backward).
void rmsnorm_forward(const float* x, const float* w, float* y, float* r, int64_t n, int64_t C, float eps);

// dx [n, C] (overwritten) and dw [C] (accumulated: += sum over the rows of dy * x * r).
void rmsnorm_backward(const float* x, const float* w, const float* r, const float* dy, float* dx, float* dw,
                      int64_t n, int64_t C);

}  // namespace moeforge::kernels::cpu
