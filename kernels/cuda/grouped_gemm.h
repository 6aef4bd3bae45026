// GEMMs of the MoE layer through cuBLAS, on row-major buffers (the layout mapping: gemm_layout.h).
// float32 or bf16 storage, always float32 compute (CUBLAS_COMPUTE_32F; a float32 product can use TF32 only
// if the caller put CUBLAS_TF32_TENSOR_OP_MATH on the handle, which these calls leave alone).
//
// `cublas` is a cublasHandle_t passed as void* (this header has no CUDA include). Every call sets the
// handle's stream to `stream` and its pointer mode to host (alpha and beta are host scalars); nothing else.
// Calls are asynchronous; they return 0, a cudaError_t, or kCublasErrorBase + cublasStatus_t (types.h).
//
// The grouped calls take the expert offsets [E + 1] on the host (the rows of expert e are
// off[e] .. off[e + 1]); weights are in nn.Linear's layout W [E, O, I]. They use one
// cublasGemmGroupedBatchedEx call (cuBLAS >= 12.5) for all experts with rows when `ptr_scratch` is given
// (grouped_gemm_scratch_bytes(E) of device memory, which receives the A/B/C pointer arrays by an
// asynchronous copy from pageable host memory, so not inside CUDA-graph capture), all types are equal, and
// gemm_layout.h's grouped_call_fits holds; otherwise (or when the grouped call answers
// CUBLAS_STATUS_NOT_SUPPORTED) one cublasGemmEx per expert with rows.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/types.h"

namespace moeforge::kernels::cuda {

// Whether this build can call cublasGemmGroupedBatchedEx (cuBLAS >= 12.5 at compile time).
bool grouped_gemm_native();

size_t grouped_gemm_scratch_bytes(int64_t n_expert);

// Row-major C [M, N] (+)= op(A) [M, K] @ op(B) [K, N]: A [M, K] or, when trans_a, [K, M]; B [K, N] or, when
// trans_b, [N, K]. A and B of type ab, C of type c (bf16 inputs may write a float32 C). accumulate: beta = 1.
int gemm(void* cublas, DType ab, DType c, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
         const void* A, const void* B, void* C, bool accumulate, void* stream);

// Forward: out[rows e] (+)= in[rows e] @ W[e]^T; in [N, I], W [E, O, I], out [N, O].
int grouped_mm_nt(void* cublas, DType dt, void* out, const void* in, const void* w, const int64_t* offsets,
                  int64_t E, int64_t O, int64_t I, bool accumulate, void* ptr_scratch, void* stream);

// Data gradient: out[rows e] (+)= in[rows e] @ W[e]; in [N, O], W [E, O, I], out [N, I].
int grouped_mm_nn(void* cublas, DType dt, void* out, const void* in, const void* w, const int64_t* offsets,
                  int64_t E, int64_t O, int64_t I, bool accumulate, void* ptr_scratch, void* stream);

// Weight gradient: dw[e] (+)= d[rows e]^T @ in[rows e]; d [N, O], in [N, I] of type dt, dw [E, O, I] of type
// dw_dt (bf16 activations may accumulate into float32 gradients; mixed types always take the per-expert
// loop). Experts without rows: dw[e] is zeroed, or left as it is when accumulate (beta = 1).
int grouped_weight_grad(void* cublas, DType dt, DType dw_dt, void* dw, const void* d, const void* in,
                        const int64_t* offsets, int64_t E, int64_t O, int64_t I, bool accumulate,
                        void* ptr_scratch, void* stream);

}  // namespace moeforge::kernels::cuda
