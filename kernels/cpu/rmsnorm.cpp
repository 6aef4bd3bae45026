#include "rmsnorm.h"

#include <cmath>

#include "simd.h"

namespace moeforge::kernels::cpu {

MOEFORGE_KERNEL_CLONES
void rmsnorm_forward(const float* x, const float* w, float* y, float* r, int64_t n, int64_t C, float eps) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * C;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    const float ri = 1.0f / std::sqrt(ss / float(C) + eps);
    r[i] = ri;
    float* yr = y + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * ri * w[c];
  }
}

// With g = dy * w: dx = r * (g - x * r^2 * mean(g * x)), and dw += dy * x * r.
MOEFORGE_KERNEL_CLONES
void rmsnorm_backward(const float* x, const float* w, const float* r, const float* dy, float* dx, float* dw,
                      int64_t n, int64_t C) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * C;
    const float* gr = dy + i * C;
    const float ri = r[i];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) dot += gr[c] * w[c] * xr[c];
    const float k = ri * ri * ri * dot / float(C);
    float* dxr = dx + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      dxr[c] = ri * gr[c] * w[c] - k * xr[c];
      dw[c] += gr[c] * xr[c] * ri;
    }
  }
}

}  // namespace moeforge::kernels::cpu
