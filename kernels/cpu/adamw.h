// One AdamW update of a flat float buffer in a single pass (docs/performance.md, "Fused AdamW").
#pragma once

#include <cstdint>

namespace moeforge::kernels::cpu {

// p <- p * decay; m <- b1 m + a1 g; v <- b2 v + a2 g^2 (a = 1 - b, rounded once by the caller);
// p <- p + step * m / (sqrt(v / bc2) + eps), for n elements (step = -lr / bc1).
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float decay, float b1, float a1,
                  float b2, float a2, float bc2, float eps, float step);

// The sum of x[i]^2 over n elements, each square taken and added in float64 (the gradient-norm clip's
// sum, src/train/optim.cpp): the same sums as converting to float64 first, without the copy.
double sum_of_squares(const float* x, int64_t n);

}  // namespace moeforge::kernels::cpu
