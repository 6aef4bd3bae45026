// CUDA twins of the CPU kernels (kernels/cpu): gather rows, fused gated SwiGLU forward and backward, gated
// scatter-add, and the gather-form combine. Raw device pointers and sizes, no LibTorch; every launch is
// asynchronous on `stream` (0 = default) and returns the launch's cudaError_t as an int (0 = success,
// types.h), so this header needs no CUDA include.
// Legend: n rows, width elements per row, F expert hidden width, K choices per token.
// Every kernel exists in float32 and bf16 (storage; math in float32). Gates and the SwiGLU d_gate stay
// float32 in both. Rows are vectorised (16-byte loads) when the width and the pointers allow it.
#pragma once

#include <cstdint>

#include "kernels/cuda/types.h"

namespace moeforge::kernels::cuda {

// out[i, :] = in[index[i], :], i < n.
int gather_rows(float* out, const float* in, const int64_t* index, int64_t n, int64_t width, void* stream);
int gather_rows(bf16* out, const bf16* in, const int64_t* index, int64_t n, int64_t width, void* stream);

// h[r, :] = gate[r] * silu(a[r, :]) * b[r, :] (gate == nullptr: 1), n rows of width F. h may alias a or b.
int swiglu_forward(float* h, const float* a, const float* b, const float* gate, int64_t n, int64_t width,
                   void* stream);
int swiglu_forward(bf16* h, const bf16* a, const bf16* b, const float* gate, int64_t n, int64_t width,
                   void* stream);

// Backward of h = gate * silu(a) * b given dh (the gradient wrt h), as kernels/cpu/swiglu.h:
//   d_gate[r] = <dh[r, :], silu(a[r, :]) * b[r, :]>   (skipped when d_gate == nullptr)
//   db = gate * dh * silu(a),  da = gate * dh * b * silu'(a),  silu'(a) = s (1 + a (1 - s)), s = sigmoid(a).
// da may alias dh (each element is read before it is written); gate == nullptr means 1. One block per row,
// d_gate reduced in float32 over the row (tree order, not the CPU's sequential order).
int swiglu_backward(float* da, float* db, float* d_gate, const float* dh, const float* a, const float* b,
                    const float* gate, int64_t n, int64_t width, void* stream);
int swiglu_backward(bf16* da, bf16* db, float* d_gate, const bf16* dh, const bf16* a, const bf16* b,
                    const float* gate, int64_t n, int64_t width, void* stream);

// out[index[i], :] += gate[i] * in[i, :] (gate == nullptr: 1), with atomic adds (rows of one token may
// meet in any order, so float sums are not bitwise reproducible). The bf16 version reads bf16 rows and
// accumulates into a float32 `out` (atomicAdd on float): adding K rows into a bf16 buffer would round
// after every add; convert the float32 result with convert() afterwards.
int scatter_add_gated(float* out, const float* in, const int64_t* index, const float* gate, int64_t n,
                      int64_t width, void* stream);
int scatter_add_gated(float* out, const bf16* in, const int64_t* index, const float* gate, int64_t n,
                      int64_t width, void* stream);

// The combine in gather form (no atomics, deterministic): for each token t < n_tokens,
//   out[t, :] = sum_{k < K} gate[row] * in[row, :],  row = row_of_assignment[t * K + k],
// summed in float32 in k order; rows < 0 (dropped choices) are skipped; gate == nullptr: 1. out is
// written, not added to. row_of_assignment is the inverse map of the counting sort (routing.h).
int combine_rows(float* out, const float* in, const int64_t* row_of_assignment, const float* gate,
                 int64_t n_tokens, int64_t k, int64_t width, void* stream);
int combine_rows(bf16* out, const bf16* in, const int64_t* row_of_assignment, const float* gate,
                 int64_t n_tokens, int64_t k, int64_t width, void* stream);

// Element-wise conversions of n values (float32 -> bf16 rounds to nearest even).
int convert(bf16* out, const float* in, int64_t n, void* stream);
int convert(float* out, const bf16* in, int64_t n, void* stream);

}  // namespace moeforge::kernels::cuda
