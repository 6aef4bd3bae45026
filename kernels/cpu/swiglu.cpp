// Compiled with -ffast-math (CMakeLists.txt) so that GCC vectorises exp through glibc's libmvec; the
// argument of exp is clamped, so the finite-math assumption holds for any finite input.
#include "swiglu.h"

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace moeforge::kernels::cpu {
namespace {

// exp(-a) for a below -kClamp is clamped: sigmoid is then < 1e-34 (float) and silu's error is below the
// smallest normal float; avoids inf, which -ffast-math assumes away.
template <typename T>
constexpr T kClamp = T(80);

template <typename T>
inline void forward_impl(T* h, const T* a, const T* b, const T* gate, int64_t n, int64_t width) {
  for (int64_t r = 0; r < n; ++r) {
    const T g = gate ? gate[r] : T(1);
    const T* ar = a + r * width;
    const T* br = b + r * width;
    T* hr = h + r * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const T x = ar[j];
      const T s = T(1) / (T(1) + std::exp(std::min(-x, kClamp<T>)));
      hr[j] = g * x * s * br[j];
    }
  }
}

template <typename T>
inline void backward_impl(T* da, T* db, T* d_gate, const T* dh, const T* a, const T* b, const T* gate,
                          int64_t n, int64_t width) {
  for (int64_t r = 0; r < n; ++r) {
    const T g = gate ? gate[r] : T(1);
    const T* ar = a + r * width;
    const T* br = b + r * width;
    const T* dhr = dh + r * width;
    T* dar = da + r * width;
    T* dbr = db + r * width;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < width; ++j) {
      const T x = ar[j], bj = br[j], d = dhr[j];
      const T s = T(1) / (T(1) + std::exp(std::min(-x, kClamp<T>)));
      const T sa = x * s;
      dot += d * sa * bj;
      const T gd = g * d;
      dbr[j] = gd * sa;
      dar[j] = gd * bj * s * (T(1) + x * (T(1) - s));
    }
    if (d_gate) d_gate[r] = dot;
  }
}

}  // namespace

MOEFORGE_KERNEL_CLONES
void swiglu_forward(float* h, const float* a, const float* b, const float* gate, int64_t n, int64_t width) {
  forward_impl(h, a, b, gate, n, width);
}
MOEFORGE_KERNEL_CLONES
void swiglu_forward(double* h, const double* a, const double* b, const double* gate, int64_t n,
                    int64_t width) {
  forward_impl(h, a, b, gate, n, width);
}
MOEFORGE_KERNEL_CLONES
void swiglu_backward(float* da, float* db, float* d_gate, const float* dh, const float* a, const float* b,
                     const float* gate, int64_t n, int64_t width) {
  backward_impl(da, db, d_gate, dh, a, b, gate, n, width);
}
MOEFORGE_KERNEL_CLONES
void swiglu_backward(double* da, double* db, double* d_gate, const double* dh, const double* a,
                     const double* b, const double* gate, int64_t n, int64_t width) {
  backward_impl(da, db, d_gate, dh, a, b, gate, n, width);
}

}  // namespace moeforge::kernels::cpu
