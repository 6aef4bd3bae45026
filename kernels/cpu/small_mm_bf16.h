// The small-GEMM path of bf16 decode (docs/performance.md, "bf16 inference"): a few rows times a weight
// stored in bf16, read once. LibTorch 1.13's bf16 product for one row runs at a few GFLOP/s (it does not
// reach oneDNN's bf16 kernels for a matrix-vector product), slower than the float32 one for every weight
// that fits in cache; this kernel reads the bf16 weight at memory speed.
// bf16 values are passed as their bit patterns: the upper 16 bits of a float32.
// Legend: n rows (a handful), n_in input width, n_out output columns computed.
#pragma once

#include <cstdint>
#include <string_view>

namespace moeforge::kernels::cpu {

// out[r * ld_out + o] = sum_i in[r * n_in + i] * w[o * n_in + i] for r < n, o < n_out, with in [n, n_in]
// and w [n_out, n_in] (nn.Linear's layout) both bf16 and every product and sum in float32. Each weight row
// is read once for up to 4 input rows; callers split n_out across threads by offsetting out and w.
void small_mm_nt_bf16(float* out, int64_t ld_out, const uint16_t* in, const uint16_t* w, int64_t n,
                      int64_t n_out, int64_t n_in);

// small_mm_nt_bf16 as built for one instruction set ("avx512bf16": vdpbf16ps; "avx2": bf16 widened to
// float32 and fused multiply-adds; "generic") whatever the CPU would pick, for tests; returns false (and
// writes nothing) when this CPU or build lacks it.
bool small_mm_nt_bf16_isa(std::string_view isa, float* out, int64_t ld_out, const uint16_t* in,
                          const uint16_t* w, int64_t n, int64_t n_out, int64_t n_in);

// The instruction set small_mm_nt_bf16 runs on this CPU ("avx512bf16", "avx2" or "generic").
std::string_view small_mm_nt_bf16_picked();

}  // namespace moeforge::kernels::cpu
