// Dispatch: gather rows of a matrix into expert order.
// Legend: n rows gathered, width elements per row.
#pragma once

#include <cstdint>

namespace moeforge::kernels::cpu {

// out[i, :] = in[index[i], :] for i in [0, n); out [n, width], in [*, width] row-major.
void gather_rows(float* out, const float* in, const int64_t* index, int64_t n, int64_t width);
void gather_rows(double* out, const double* in, const int64_t* index, int64_t n, int64_t width);

}  // namespace moeforge::kernels::cpu
