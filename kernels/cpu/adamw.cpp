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

}  // namespace moeforge::kernels::cpu
