// Combine: add gated expert output rows back to their tokens.
// Legend: n rows (assignments), width elements per row; several rows may belong to one token.
#pragma once

#include <cstdint>

namespace moeforge::kernels::cpu {

// out[index[i], c] += gate[i] * in[i, c] for i in [0, n) and columns c in [c0, c1) only; gate == nullptr
// means weight 1. Rows of one token are added in ascending i, so results do not depend on threading; callers
// split the columns across threads, which cannot race (two rows of one token touch the same out row).
// out [*, width], in [n, width].
void scatter_add_gated(float* out, const float* in, const int64_t* index, const float* gate, int64_t n,
                       int64_t width, int64_t c0, int64_t c1);
void scatter_add_gated(double* out, const double* in, const int64_t* index, const double* gate, int64_t n,
                       int64_t width, int64_t c0, int64_t c1);

}  // namespace moeforge::kernels::cpu
