#include <cuda_runtime.h>

#include "moe_ops.h"

namespace moeforge::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row, threads stride over the columns (coalesced reads and writes).
__global__ void gather_rows_kernel(float* out, const float* in, const int64_t* index, int64_t width) {
  const int64_t i = blockIdx.x;
  const float* src = in + index[i] * width;
  float* dst = out + i * width;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[c];
}

__global__ void swiglu_forward_kernel(float* h, const float* a, const float* b, const float* gate,
                                      int64_t width) {
  const int64_t r = blockIdx.x;
  const float g = gate ? gate[r] : 1.0f;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    const float x = a[r * width + j];
    h[r * width + j] = g * x / (1.0f + __expf(-x)) * b[r * width + j];
  }
}

__global__ void scatter_add_gated_kernel(float* out, const float* in, const int64_t* index, const float* gate,
                                         int64_t width) {
  const int64_t i = blockIdx.x;
  const float g = gate ? gate[i] : 1.0f;
  float* dst = out + index[i] * width;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) atomicAdd(dst + c, g * in[i * width + c]);
}

int launched() {
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int gather_rows(float* out, const float* in, const int64_t* index, int64_t n, int64_t width, void* stream) {
  if (n == 0) return 0;
  gather_rows_kernel<<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, in, index, width);
  return launched();
}

int swiglu_forward(float* h, const float* a, const float* b, const float* gate, int64_t n, int64_t width,
                   void* stream) {
  if (n == 0) return 0;
  swiglu_forward_kernel<<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      h, a, b, gate, width);
  return launched();
}

int scatter_add_gated(float* out, const float* in, const int64_t* index, const float* gate, int64_t n,
                      int64_t width, void* stream) {
  if (n == 0) return 0;
  scatter_add_gated_kernel<<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, in, index, gate, width);
  return launched();
}

}  // namespace moeforge::kernels::cuda
