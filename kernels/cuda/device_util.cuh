// Internal to kernels/cuda (.cu files only): element conversions, 16-byte row packs, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "kernels/cuda/types.h"

namespace moeforge::kernels::cuda::detail {

static_assert(sizeof(bf16) == sizeof(__nv_bfloat16) && alignof(bf16) == alignof(__nv_bfloat16),
              "bf16 and __nv_bfloat16 must share their layout");

// The device type of a header type: float stays float, bf16 becomes __nv_bfloat16.
template <typename T>
struct Device {
  using type = T;
};
template <>
struct Device<bf16> {
  using type = __nv_bfloat16;
};

template <typename T>
auto* dev(T* p) {
  return reinterpret_cast<typename Device<T>::type*>(p);
}
template <typename T>
const auto* dev(const T* p) {
  return reinterpret_cast<const typename Device<T>::type*>(p);
}

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V consecutive elements loaded and stored as one aligned vector (16 bytes when V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load(float (&f)[V], const T* p) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) f[i] = to_float(pk.v[i]);
}
template <int V, typename T>
__device__ __forceinline__ void store(T* p, const float (&f)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = from_float<T>(f[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Elements per 16-byte vector for T.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

// Whether rows of `width` elements of T starting at each pointer are all 16-byte aligned (so that the
// V = kVec<T> path applies). nullptr counts as aligned.
template <typename T>
inline bool vectorisable(int64_t width, std::initializer_list<const void*> ptrs) {
  if ((width * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total. `smem` holds
// 32 floats; the function synchronises the block twice.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warp = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float t = lane < n_warp ? smem[lane] : 0.0f;
  t = warp_sum(t);
  __syncthreads();  // smem may be reused by the caller right after
  return t;
}

inline cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}

inline int launched() {
  return static_cast<int>(cudaGetLastError());
}

// Threads for a one-block-per-row kernel whose threads each take `per_thread` elements of `width`.
inline unsigned row_threads(int64_t width, int per_thread) {
  const int64_t need = (width + per_thread - 1) / per_thread;
  int64_t t = ((need + 31) / 32) * 32;
  if (t < 32) t = 32;
  if (t > 256) t = 256;
  return static_cast<unsigned>(t);
}

// Row-parallel grids use blockIdx.x as the row: at most 2^31 - 1 rows.
constexpr int64_t kMaxGrid = 2147483647;

}  // namespace moeforge::kernels::cuda::detail
