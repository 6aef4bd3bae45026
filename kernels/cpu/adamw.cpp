#include "adamw.h"

#include <cmath>

#include "simd.h"

namespace moeforge::kernels::cpu {

// The plain twin's operations (src/train/optim.cpp) element by element; LibTorch's own kernels may fuse a
// multiply-add or order a product differently, so the two agree to float rounding, not bit for bit
// (tests/test_fused_ops.cpp).
MOEFORGE_KERNEL_CLONES
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float decay, float b1, float a1,
                  float b2, float a2, float bc2, float eps, float step) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = m[i] * b1 + a1 * gi;
    const float vi = v[i] * b2 + a2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    const float denom = std::sqrt(vi / bc2) + eps;
    p[i] = p[i] * decay + step * (mi / denom);
  }
}

// Eight float64 partial sums, so that the loop vectorises (a single running sum would be a serial
// dependency); the order of additions differs from a plain loop's, within float64 rounding.
MOEFORGE_KERNEL_CLONES
double sum_of_squares(const float* x, int64_t n) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double v = static_cast<double>(x[i + l]);
      acc[l] += v * v;
    }
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    acc[0] += v * v;
  }
  double s = 0;
  for (double a : acc) s += a;
  return s;
}

}  // namespace moeforge::kernels::cpu
