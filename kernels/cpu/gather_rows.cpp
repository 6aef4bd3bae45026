#include "gather_rows.h"

#include <cstring>

namespace moeforge::kernels::cpu {
namespace {

template <typename T>
void gather_rows_impl(T* out, const T* in, const int64_t* index, int64_t n, int64_t width) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(out + i * width, in + index[i] * width, sizeof(T) * width);
}

}  // namespace

void gather_rows(float* out, const float* in, const int64_t* index, int64_t n, int64_t width) {
  gather_rows_impl(out, in, index, n, width);
}
void gather_rows(double* out, const double* in, const int64_t* index, int64_t n, int64_t width) {
  gather_rows_impl(out, in, index, n, width);
}

}  // namespace moeforge::kernels::cpu
