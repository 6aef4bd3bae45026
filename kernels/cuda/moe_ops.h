// CUDA twins of the CPU kernels (kernels/cpu): gather rows, fused gated SwiGLU forward, gated scatter-add.
// Raw device pointers and sizes, no LibTorch; every launch is asynchronous on `stream` (0 = default) and
// returns the launch's cudaError_t as an int (0 = success), so this header needs no CUDA include.
// Legend: n rows, width elements per row, F expert hidden width.
#pragma once

#include <cstdint>

namespace moeforge::kernels::cuda {

// out[i, :] = in[index[i], :], i < n.
int gather_rows(float* out, const float* in, const int64_t* index, int64_t n, int64_t width, void* stream);

// h[r, :] = gate[r] * silu(a[r, :]) * b[r, :] (gate == nullptr: 1), n rows of width F.
int swiglu_forward(float* h, const float* a, const float* b, const float* gate, int64_t n, int64_t width,
                   void* stream);

// out[index[i], :] += gate[i] * in[i, :] (gate == nullptr: 1), with atomic adds (rows of one token may
// meet in any order, so float sums are not bitwise reproducible).
int scatter_add_gated(float* out, const float* in, const int64_t* index, const float* gate, int64_t n,
                      int64_t width, void* stream);

}  // namespace moeforge::kernels::cuda
