#include "scatter_add_gated.h"

#include "simd.h"

namespace moeforge::kernels::cpu {
namespace {

template <typename T>
inline void scatter_impl(T* out, const T* in, const int64_t* index, const T* gate, int64_t n, int64_t width,
                         int64_t c0, int64_t c1) {
  for (int64_t i = 0; i < n; ++i) {
    T* o = out + index[i] * width;
    const T* x = in + i * width;
    const T g = gate ? gate[i] : T(1);
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) o[c] += g * x[c];
  }
}

}  // namespace

MOEFORGE_KERNEL_CLONES
void scatter_add_gated(float* out, const float* in, const int64_t* index, const float* gate, int64_t n,
                       int64_t width, int64_t c0, int64_t c1) {
  scatter_impl(out, in, index, gate, n, width, c0, c1);
}
MOEFORGE_KERNEL_CLONES
void scatter_add_gated(double* out, const double* in, const int64_t* index, const double* gate, int64_t n,
                       int64_t width, int64_t c0, int64_t c1) {
  scatter_impl(out, in, index, gate, n, width, c0, c1);
}

}  // namespace moeforge::kernels::cpu
