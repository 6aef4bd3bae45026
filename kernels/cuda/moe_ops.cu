#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/moe_ops.h"

namespace moeforge::kernels::cuda {
namespace {

using detail::as_stream;
using detail::from_float;
using detail::kMaxGrid;
using detail::kVec;
using detail::launched;
using detail::load;
using detail::row_threads;
using detail::store;
using detail::to_float;
using detail::vectorisable;

// One block per row, threads stride over the row's words (coalesced reads and writes). A pure copy, so
// it works on machine words W of the widest size that the row length and both pointers allow.
template <typename W>
__global__ void gather_rows_kernel(W* out, const W* in, const int64_t* index, int64_t words) {
  const int64_t i = blockIdx.x;
  const W* src = in + index[i] * words;
  W* dst = out + i * words;
  for (int64_t c = threadIdx.x; c < words; c += blockDim.x) dst[c] = src[c];
}

template <typename W>
void launch_gather(void* out, const void* in, const int64_t* index, int64_t n, int64_t bytes,
                   cudaStream_t s) {
  const int64_t words = bytes / static_cast<int64_t>(sizeof(W));
  gather_rows_kernel<W><<<static_cast<unsigned>(n), row_threads(words, 1), 0, s>>>(
      static_cast<W*>(out), static_cast<const W*>(in), index, words);
}

int gather_impl(void* out, const void* in, const int64_t* index, int64_t n, int64_t row_bytes, void* stream) {
  if (n == 0 || row_bytes == 0) return 0;
  if (n > kMaxGrid) return static_cast<int>(cudaErrorInvalidValue);
  const uintptr_t al =
      reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(in) | static_cast<uintptr_t>(row_bytes);
  const cudaStream_t s = as_stream(stream);
  if (al % 16 == 0)
    launch_gather<uint4>(out, in, index, n, row_bytes, s);
  else if (al % 8 == 0)
    launch_gather<uint2>(out, in, index, n, row_bytes, s);
  else if (al % 4 == 0)
    launch_gather<uint32_t>(out, in, index, n, row_bytes, s);
  else
    launch_gather<uint16_t>(out, in, index, n, row_bytes, s);
  return launched();
}

// Rows of width elements, V consecutive elements per thread and step (V > 1 only when every row start
// is 16-byte aligned and width % V == 0).
template <typename T, int V>
__global__ void swiglu_forward_kernel(T* h, const T* a, const T* b, const float* gate, int64_t width) {
  const int64_t r = blockIdx.x;
  const float g = gate ? gate[r] : 1.0f;
  const int64_t base = r * width;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < width;
       j += static_cast<int64_t>(blockDim.x) * V) {
    float x[V], y[V], o[V];
    load<V>(x, a + base + j);
    load<V>(y, b + base + j);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = g * x[i] / (1.0f + __expf(-x[i])) * y[i];
    store<V>(h + base + j, o);
  }
}

template <typename T, int V>
__global__ void swiglu_backward_kernel(T* da, T* db, float* d_gate, const T* dh, const T* a, const T* b,
                                       const float* gate, int64_t width) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const float g = gate ? gate[r] : 1.0f;
  const int64_t base = r * width;
  float dot = 0.0f;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < width;
       j += static_cast<int64_t>(blockDim.x) * V) {
    float d[V], x[V], y[V], ga[V], gb[V];
    load<V>(d, dh + base + j);
    load<V>(x, a + base + j);
    load<V>(y, b + base + j);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float s = 1.0f / (1.0f + __expf(-x[i]));
      const float sa = x[i] * s;
      dot += d[i] * sa * y[i];
      const float gd = g * d[i];
      gb[i] = gd * sa;
      ga[i] = gd * y[i] * s * (1.0f + x[i] * (1.0f - s));
    }
    store<V>(db + base + j, gb);
    store<V>(da + base + j, ga);  // after the loads of this step: da may alias dh
  }
  if (d_gate) {  // uniform over the block, so the block-wide reduction is safe
    dot = detail::block_sum(dot, smem);
    if (threadIdx.x == 0) d_gate[r] = dot;
  }
}

template <typename T>
__global__ void scatter_add_gated_kernel(float* out, const T* in, const int64_t* index, const float* gate,
                                         int64_t width) {
  const int64_t i = blockIdx.x;
  const float g = gate ? gate[i] : 1.0f;
  float* dst = out + index[i] * width;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x)
    atomicAdd(dst + c, g * to_float(in[i * width + c]));
}

template <typename T, int V>
__global__ void combine_rows_kernel(T* out, const T* in, const int64_t* row_of, const float* gate, int64_t k,
                                    int64_t width) {
  const int64_t t = blockIdx.x;
  const int64_t* rows = row_of + t * k;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < width;
       j += static_cast<int64_t>(blockDim.x) * V) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    for (int64_t kk = 0; kk < k; ++kk) {
      const int64_t row = rows[kk];
      if (row < 0) continue;
      const float g = gate ? gate[row] : 1.0f;
      float v[V];
      load<V>(v, in + row * width + j);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += g * v[i];
    }
    store<V>(out + t * width + j, acc);
  }
}

template <typename To, typename From>
__global__ void convert_kernel(To* out, const From* in, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<To>(to_float(in[i]));
}

template <typename T>
int swiglu_forward_impl(T* h, const T* a, const T* b, const float* gate, int64_t n, int64_t width,
                        void* stream) {
  if (n == 0 || width == 0) return 0;
  if (n > kMaxGrid) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = as_stream(stream);
  constexpr int V = kVec<T>;
  if (vectorisable<T>(width, {h, a, b}))
    swiglu_forward_kernel<T, V>
        <<<static_cast<unsigned>(n), row_threads(width, V), 0, s>>>(h, a, b, gate, width);
  else
    swiglu_forward_kernel<T, 1>
        <<<static_cast<unsigned>(n), row_threads(width, 1), 0, s>>>(h, a, b, gate, width);
  return launched();
}

template <typename T>
int swiglu_backward_impl(T* da, T* db, float* d_gate, const T* dh, const T* a, const T* b, const float* gate,
                         int64_t n, int64_t width, void* stream) {
  if (n == 0) return 0;
  if (n > kMaxGrid) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = as_stream(stream);
  constexpr int V = kVec<T>;
  if (vectorisable<T>(width, {da, db, dh, a, b}))
    swiglu_backward_kernel<T, V>
        <<<static_cast<unsigned>(n), row_threads(width, V), 0, s>>>(da, db, d_gate, dh, a, b, gate, width);
  else
    swiglu_backward_kernel<T, 1>
        <<<static_cast<unsigned>(n), row_threads(width, 1), 0, s>>>(da, db, d_gate, dh, a, b, gate, width);
  return launched();
}

template <typename T>
int scatter_impl(float* out, const T* in, const int64_t* index, const float* gate, int64_t n, int64_t width,
                 void* stream) {
  if (n == 0 || width == 0) return 0;
  if (n > kMaxGrid) return static_cast<int>(cudaErrorInvalidValue);
  scatter_add_gated_kernel<T><<<static_cast<unsigned>(n), row_threads(width, 1), 0, as_stream(stream)>>>(
      out, in, index, gate, width);
  return launched();
}

template <typename T>
int combine_impl(T* out, const T* in, const int64_t* row_of, const float* gate, int64_t n_tokens, int64_t k,
                 int64_t width, void* stream) {
  if (n_tokens == 0 || width == 0) return 0;
  if (n_tokens > kMaxGrid || k < 0) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = as_stream(stream);
  constexpr int V = kVec<T>;
  const auto blocks = static_cast<unsigned>(n_tokens);
  if (vectorisable<T>(width, {out, in}))
    combine_rows_kernel<T, V><<<blocks, row_threads(width, V), 0, s>>>(out, in, row_of, gate, k, width);
  else
    combine_rows_kernel<T, 1><<<blocks, row_threads(width, 1), 0, s>>>(out, in, row_of, gate, k, width);
  return launched();
}

template <typename To, typename From>
int convert_impl(To* out, const From* in, int64_t n, void* stream) {
  if (n == 0) return 0;
  constexpr int64_t kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65536);
  convert_kernel<To, From><<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(stream)>>>(out, in, n);
  return launched();
}

}  // namespace

using detail::dev;

int gather_rows(float* out, const float* in, const int64_t* index, int64_t n, int64_t width, void* stream) {
  return gather_impl(out, in, index, n, width * 4, stream);
}
int gather_rows(bf16* out, const bf16* in, const int64_t* index, int64_t n, int64_t width, void* stream) {
  return gather_impl(out, in, index, n, width * 2, stream);
}

int swiglu_forward(float* h, const float* a, const float* b, const float* gate, int64_t n, int64_t width,
                   void* stream) {
  return swiglu_forward_impl(h, a, b, gate, n, width, stream);
}
int swiglu_forward(bf16* h, const bf16* a, const bf16* b, const float* gate, int64_t n, int64_t width,
                   void* stream) {
  return swiglu_forward_impl(dev(h), dev(a), dev(b), gate, n, width, stream);
}

int swiglu_backward(float* da, float* db, float* d_gate, const float* dh, const float* a, const float* b,
                    const float* gate, int64_t n, int64_t width, void* stream) {
  return swiglu_backward_impl(da, db, d_gate, dh, a, b, gate, n, width, stream);
}
int swiglu_backward(bf16* da, bf16* db, float* d_gate, const bf16* dh, const bf16* a, const bf16* b,
                    const float* gate, int64_t n, int64_t width, void* stream) {
  return swiglu_backward_impl(dev(da), dev(db), d_gate, dev(dh), dev(a), dev(b), gate, n, width, stream);
}

int scatter_add_gated(float* out, const float* in, const int64_t* index, const float* gate, int64_t n,
                      int64_t width, void* stream) {
  return scatter_impl(out, in, index, gate, n, width, stream);
}
int scatter_add_gated(float* out, const bf16* in, const int64_t* index, const float* gate, int64_t n,
                      int64_t width, void* stream) {
  return scatter_impl(out, dev(in), index, gate, n, width, stream);
}

int combine_rows(float* out, const float* in, const int64_t* row_of_assignment, const float* gate,
                 int64_t n_tokens, int64_t k, int64_t width, void* stream) {
  return combine_impl(out, in, row_of_assignment, gate, n_tokens, k, width, stream);
}
int combine_rows(bf16* out, const bf16* in, const int64_t* row_of_assignment, const float* gate,
                 int64_t n_tokens, int64_t k, int64_t width, void* stream) {
  return combine_impl(dev(out), dev(in), row_of_assignment, gate, n_tokens, k, width, stream);
}

int convert(bf16* out, const float* in, int64_t n, void* stream) {
  return convert_impl(dev(out), in, n, stream);
}
int convert(float* out, const bf16* in, int64_t n, void* stream) {
  return convert_impl(out, dev(in), n, stream);
}

}  // namespace moeforge::kernels::cuda
