// Compiled with -ffast-math (CMakeLists.txt) so that GCC vectorises erf and exp through glibc's libmvec;
// exp's argument is clamped, so the finite-math assumption holds for any finite input.
#include "gelu.h"

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace moeforge::kernels::cpu {
namespace {

template <typename T>
constexpr T kInvSqrt2 = T(0.70710678118654752440);
template <typename T>
constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
// x^2 / 2 above this gives exp(-x^2 / 2) < 1e-65, zero in float and negligible against Phi(x) ~ 1 in
// double; the clamp keeps x^2 from overflowing to inf, which -ffast-math assumes away.
template <typename T>
constexpr T kHalfSquareClamp = T(150);

template <typename T>
inline void forward_impl(T* h, const T* a, const T* gate, int64_t n, int64_t width) {
  for (int64_t r = 0; r < n; ++r) {
    const T g = gate ? gate[r] : T(1);
    const T* ar = a + r * width;
    T* hr = h + r * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const T x = ar[j];
      hr[j] = g * T(0.5) * x * (T(1) + std::erf(x * kInvSqrt2<T>));
    }
  }
}

template <typename T>
inline void backward_impl(T* da, T* d_gate, const T* dh, const T* a, const T* gate, int64_t n,
                          int64_t width) {
  for (int64_t r = 0; r < n; ++r) {
    const T g = gate ? gate[r] : T(1);
    const T* ar = a + r * width;
    const T* dhr = dh + r * width;
    T* dar = da + r * width;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < width; ++j) {
      const T x = ar[j], d = dhr[j];
      const T cdf = T(0.5) * (T(1) + std::erf(x * kInvSqrt2<T>));
      const T pdf = kInvSqrt2Pi<T> * std::exp(-std::min(T(0.5) * x * x, kHalfSquareClamp<T>));
      dot += d * x * cdf;
      dar[j] = g * d * (cdf + x * pdf);
    }
    if (d_gate) d_gate[r] = dot;
  }
}

}  // namespace

MOEFORGE_KERNEL_CLONES
void gelu_forward(float* h, const float* a, const float* gate, int64_t n, int64_t width) {
  forward_impl(h, a, gate, n, width);
}
MOEFORGE_KERNEL_CLONES
void gelu_forward(double* h, const double* a, const double* gate, int64_t n, int64_t width) {
  forward_impl(h, a, gate, n, width);
}
MOEFORGE_KERNEL_CLONES
void gelu_backward(float* da, float* d_gate, const float* dh, const float* a, const float* gate, int64_t n,
                   int64_t width) {
  backward_impl(da, d_gate, dh, a, gate, n, width);
}
MOEFORGE_KERNEL_CLONES
void gelu_backward(double* da, double* d_gate, const double* dh, const double* a, const double* gate,
                   int64_t n, int64_t width) {
  backward_impl(da, d_gate, dh, a, gate, n, width);
}

}  // namespace moeforge::kernels::cpu
