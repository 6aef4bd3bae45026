// Types shared by the CUDA kernels' headers, with no CUDA include: a bf16 storage type, the dtype tag of
// the type-erased entry points (GEMMs, MoE driver) and the error codes every entry point returns.
#pragma once

#include <cstdint>

namespace moeforge::kernels::cuda {

// bfloat16 storage (the upper 16 bits of a float32), bit-compatible with CUDA's __nv_bfloat16; the .cu
// files reinterpret it as such. Math is always done in float32.
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 must be two bytes");

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

inline int64_t dtype_size(DType t) {
  return t == DType::kFloat32 ? 4 : 2;
}

// Return codes of every entry point: 0 on success; a cudaError_t as its value (1 .. kCublasErrorBase - 1);
// a cublasStatus_t s != 0 as kCublasErrorBase + s, so the two enums (which overlap) stay apart.
constexpr int kCublasErrorBase = 1 << 20;

// A readable name for a return code (cudaGetErrorString or the cuBLAS status name).
const char* error_string(int code);

}  // namespace moeforge::kernels::cuda
