// The small-GEMM path of decode: a few rows times an expert's weight, where BLAS's packing and thread
// start-up cost more than the product itself.
// Legend: n rows (a handful), n_in input width, n_out output columns computed.
#pragma once

#include <cstdint>
#include <string_view>

namespace moeforge::kernels::cpu {

// out[r * ld_out + o] = sum_i in[r * n_in + i] * w[o * n_in + i] for r < n, o < n_out: in [n, n_in] times
// the transpose of a row-major weight w [n_out, n_in] (nn.Linear's layout). Each weight row is read once
// for all n rows; callers split n_out across threads by offsetting out and w.
void small_mm_nt(float* out, int64_t ld_out, const float* in, const float* w, int64_t n, int64_t n_out,
                 int64_t n_in);
// small_mm_nt's float kernel as built for one instruction set ("avx512", "avx2" or "generic") whatever
// the CPU would pick, for tests; returns false (and writes nothing) when this CPU or build lacks it.
bool small_mm_nt_isa(std::string_view isa, float* out, int64_t ld_out, const float* in, const float* w,
                     int64_t n, int64_t n_out, int64_t n_in);
void small_mm_nt(double* out, int64_t ld_out, const double* in, const double* w, int64_t n, int64_t n_out,
                 int64_t n_in);

}  // namespace moeforge::kernels::cpu
