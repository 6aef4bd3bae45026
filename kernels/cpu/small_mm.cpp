// Compiled with -ffast-math (CMakeLists.txt) so that the dot products vectorise (reassociated sums).
#include "small_mm.h"

#include "simd.h"

namespace moeforge::kernels::cpu {
namespace {

template <typename T>
inline void small_mm_impl(T* out, int64_t ld_out, const T* in, const T* w, int64_t n, int64_t n_out,
                          int64_t n_in) {
  for (int64_t o = 0; o < n_out; ++o) {
    const T* wo = w + o * n_in;  // stays in L1 across the n rows
    for (int64_t r = 0; r < n; ++r) {
      const T* x = in + r * n_in;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n_in; ++i) acc += x[i] * wo[i];
      out[r * ld_out + o] = acc;
    }
  }
}

}  // namespace

MOEFORGE_KERNEL_CLONES
void small_mm_nt(float* out, int64_t ld_out, const float* in, const float* w, int64_t n, int64_t n_out,
                 int64_t n_in) {
  small_mm_impl(out, ld_out, in, w, n, n_out, n_in);
}
MOEFORGE_KERNEL_CLONES
void small_mm_nt(double* out, int64_t ld_out, const double* in, const double* w, int64_t n, int64_t n_out,
                 int64_t n_in) {
  small_mm_impl(out, ld_out, in, w, n, n_out, n_in);
}

}  // namespace moeforge::kernels::cpu
