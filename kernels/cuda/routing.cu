#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/routing.h"

namespace moeforge::kernels::cuda {
namespace {

using detail::as_stream;
using detail::launched;
using detail::to_float;
using detail::warp_max;
using detail::warp_sum;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kTopKWarps = 4;  // tokens per block of the router kernels

// One warp per token; lane l holds experts l, l + 32, ..., l + 32 (J - 1) in registers (E <= 32 J).
template <typename In, int J>
__global__ void topk_softmax_kernel(float* probs, float* gates, int32_t* ids, const In* logits, int64_t T,
                                    int E, int K, bool renormalize) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTopKWarps + (threadIdx.x >> 5);
  if (t >= T) return;  // the whole warp leaves together
  const In* row = logits + t * E;
  float v[J];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? to_float(row[e]) : -INFINITY;
    mx = fmaxf(mx, v[j]);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? expf(v[j] - mx) : 0.0f;
    sum += v[j];
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int e = lane + 32 * j;
    v[j] = v[j] / sum;  // division, as torch.softmax, rather than a multiply by 1 / sum
    if (probs != nullptr && e < E) probs[t * E + e] = v[j];
  }

  // K rounds of a warp arg-max over the experts not yet taken. Key (probability, -id): NaN ranks as
  // -inf, ties go to the lower id; the order is total, so the butterfly leaves every lane the same winner.
  unsigned taken = 0;  // bit j: expert lane + 32 j already selected
  float my_gate = 0.0f, sel_sum = 0.0f;
  int my_id = 0;
  for (int k = 0; k < K; ++k) {
    float best = -INFINITY, best_raw = 0.0f;
    int best_e = INT_MAX;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int e = lane + 32 * j;
      if (e >= E || ((taken >> j) & 1u)) continue;
      const float key = v[j] == v[j] ? v[j] : -INFINITY;
      if (key > best || (key == best && e < best_e)) best = key, best_e = e, best_raw = v[j];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(kFull, best, o);
      const int oe = __shfl_xor_sync(kFull, best_e, o);
      const float oraw = __shfl_xor_sync(kFull, best_raw, o);
      if (ob > best || (ob == best && oe < best_e)) best = ob, best_e = oe, best_raw = oraw;
    }
    if ((best_e & 31) == lane) taken |= 1u << (best_e >> 5);
    if (lane == k) my_gate = best_raw, my_id = best_e;
    sel_sum += best_raw;
  }
  if (lane < K) {
    gates[t * K + lane] = renormalize ? my_gate / sel_sum : my_gate;
    ids[t * K + lane] = my_id;
  }
}

template <int J>
__global__ void topk_softmax_backward_kernel(float* d_logits, const float* d_gates, const float* d_probs,
                                             const float* probs, const float* gates, const int32_t* ids,
                                             int64_t T, int E, int K, bool renormalize) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTopKWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  float p[J], dp[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int e = lane + 32 * j;
    p[j] = e < E ? probs[t * E + e] : 0.0f;
    dp[j] = (d_probs != nullptr && e < E) ? d_probs[t * E + e] : 0.0f;
  }
  // Lane k < K holds choice k: its id and the gradient that reaches its probability.
  int id = 0;
  float dg = 0.0f, g = 0.0f, p_sel = 0.0f;
  if (lane < K) {
    id = ids[t * K + lane];
    dg = d_gates[t * K + lane];
    g = gates[t * K + lane];
    p_sel = probs[t * E + id];
  }
  float c = dg;
  if (renormalize) {
    const float s = warp_sum(p_sel);
    const float dot = warp_sum(dg * g);
    c = (dg - dot) / s;
  }
  for (int k = 0; k < K; ++k) {
    const int idk = __shfl_sync(kFull, id, k);
    const float ck = __shfl_sync(kFull, c, k);
#pragma unroll
    for (int j = 0; j < J; ++j)
      dp[j] += lane + 32 * j == idk ? ck : 0.0f;  // static indices: dp stays in registers
  }
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < J; ++j) s += p[j] * dp[j];
  s = warp_sum(s);
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int e = lane + 32 * j;
    if (e < E) d_logits[t * E + e] = p[j] * (dp[j] - s);
  }
}

bool topk_args_ok(int64_t T, int64_t E, int64_t K) {
  return T >= 0 && E >= 1 && E <= kTopKMaxExperts && K >= 1 && K <= E && K <= kTopKMaxK &&
         (T + kTopKWarps - 1) / kTopKWarps <= detail::kMaxGrid;
}

// Calls launch(std::integral_constant<int, J>{}) with the experts per lane J (1, 2, 4 or 8, E <= 32 J) of
// the router kernels for E experts.
template <typename Launch>
void with_experts_per_lane(int64_t E, Launch&& launch) {
  if (E <= 32)
    launch(std::integral_constant<int, 1>{});
  else if (E <= 64)
    launch(std::integral_constant<int, 2>{});
  else if (E <= 128)
    launch(std::integral_constant<int, 4>{});
  else
    launch(std::integral_constant<int, 8>{});
}

template <typename In>
int topk_impl(float* probs, float* gates, int32_t* ids, const In* logits, int64_t T, int64_t E, int64_t K,
              bool renormalize, void* stream) {
  if (!topk_args_ok(T, E, K)) return static_cast<int>(cudaErrorInvalidValue);
  if (T == 0) return 0;
  const auto blocks = static_cast<unsigned>((T + kTopKWarps - 1) / kTopKWarps);
  const cudaStream_t s = as_stream(stream);
  const int e = static_cast<int>(E), k = static_cast<int>(K);
  with_experts_per_lane(E, [&](auto per_lane) {
    topk_softmax_kernel<In, decltype(per_lane)::value>
        <<<blocks, 32 * kTopKWarps, 0, s>>>(probs, gates, ids, logits, T, e, k, renormalize);
  });
  return launched();
}

// Counting sort, launch 1: chunk c's histogram over its kSortChunk assignments (shared-memory atomics; the
// counts do not depend on their order).
__global__ void chunk_histogram_kernel(int32_t* hist, const int32_t* choices, int64_t n, int E) {
  extern __shared__ int32_t count[];
  const int64_t c = blockIdx.x;
  for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
  __syncthreads();
  const int64_t p0 = c * kSortChunk, p1 = min(n, p0 + kSortChunk);
  for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
    const int e = choices[p];
    if (e >= 0 && e < E) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[c * E + e] = count[e];
}

// Launch 2, one block, thread e per expert: hist[c, e] becomes the first row of expert e's assignments from
// chunk c (offsets[e] + the count of e in chunks before c); offsets is the exclusive scan of the totals.
__global__ void sort_scan_kernel(int64_t* offsets, int32_t* hist, int64_t chunks, int E) {
  __shared__ int64_t warp_total[32];
  const int e = threadIdx.x, lane = e & 31, warp = e >> 5, n_warp = blockDim.x >> 5;
  int64_t count = 0;
  if (e < E)
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t h = hist[c * E + e];
      hist[c * E + e] = static_cast<int32_t>(count);
      count += h;
    }
  int64_t incl = count;  // inclusive scan inside the warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t x = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += x;
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < n_warp ? warp_total[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t x = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += x;
    }
    warp_total[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int64_t before = warp == 0 ? 0 : warp_total[warp - 1];
  const int64_t excl = before + incl - count;
  if (e < E) {
    offsets[e] = excl;
    for (int64_t c = 0; c < chunks; ++c) hist[c * E + e] += static_cast<int32_t>(excl);
  }
  if (e == static_cast<int>(blockDim.x) - 1) offsets[E] = before + incl;  // the total: threads >= E count 0
}

// Launch 3, one warp per chunk, walking it in order 32 assignments at a time: lanes with the same expert
// find each other with __match_any_sync, take consecutive slots in lane order from the chunk's cursor for
// that expert, and the lowest of them advances the cursor. Chunks start from their scanned bases, so rows
// come out in ascending flat order inside each expert: the CPU plan's stable order.
__global__ void stable_scatter_kernel(int64_t* token_index, int64_t* row_of, float* gate_rows,
                                      const int32_t* choices, const float* gates, const int32_t* base,
                                      int64_t n, int64_t K, int E) {
  extern __shared__ int32_t cursor[];
  const int64_t c = blockIdx.x;
  const int lane = threadIdx.x;
  for (int e = lane; e < E; e += 32) cursor[e] = base[c * E + e];
  __syncwarp();
  const unsigned below = (1u << lane) - 1u;
  const int64_t p0 = c * kSortChunk, p1 = min(n, p0 + kSortChunk);
  for (int64_t q = p0; q < p1; q += 32) {
    const int64_t p = q + lane;
    int e = p < p1 ? choices[p] : -1;
    if (e < 0 || e >= E) e = -1;
    const unsigned peers = __match_any_sync(kFull, e);
    const int64_t slot = e >= 0 ? static_cast<int64_t>(cursor[e]) + __popc(peers & below) : -1;
    __syncwarp();  // every peer has read the cursor before it moves
    if (e >= 0 && (peers & below) == 0u) cursor[e] += __popc(peers);
    __syncwarp();
    if (p < p1) {
      row_of[p] = slot;
      if (e >= 0) {
        token_index[slot] = p / K;
        if (gate_rows != nullptr && gates != nullptr) gate_rows[slot] = gates[p];
      }
    }
  }
}

}  // namespace

int topk_softmax(float* probs, float* gates, int32_t* ids, const float* logits, int64_t T, int64_t E,
                 int64_t K, bool renormalize, void* stream) {
  return topk_impl(probs, gates, ids, logits, T, E, K, renormalize, stream);
}
int topk_softmax(float* probs, float* gates, int32_t* ids, const bf16* logits, int64_t T, int64_t E,
                 int64_t K, bool renormalize, void* stream) {
  return topk_impl(probs, gates, ids, detail::dev(logits), T, E, K, renormalize, stream);
}

int topk_softmax_backward(float* d_logits, const float* d_gates, const float* d_probs, const float* probs,
                          const float* gates, const int32_t* ids, int64_t T, int64_t E, int64_t K,
                          bool renormalize, void* stream) {
  if (!topk_args_ok(T, E, K)) return static_cast<int>(cudaErrorInvalidValue);
  if (T == 0) return 0;
  const auto blocks = static_cast<unsigned>((T + kTopKWarps - 1) / kTopKWarps);
  const cudaStream_t s = as_stream(stream);
  const int e = static_cast<int>(E), k = static_cast<int>(K);
  with_experts_per_lane(E, [&](auto per_lane) {
    topk_softmax_backward_kernel<decltype(per_lane)::value><<<blocks, 32 * kTopKWarps, 0, s>>>(
        d_logits, d_gates, d_probs, probs, gates, ids, T, e, k, renormalize);
  });
  return launched();
}

size_t expert_sort_scratch_bytes(int64_t n_assign, int64_t n_expert) {
  const int64_t chunks = std::max<int64_t>(1, (n_assign + kSortChunk - 1) / kSortChunk);
  return static_cast<size_t>(chunks * n_expert) * sizeof(int32_t);
}

int expert_counting_sort(int64_t* expert_offsets, int64_t* token_index, int64_t* row_of_assignment,
                         float* gate_rows, const int32_t* choices, const float* gates, int64_t T, int64_t K,
                         int64_t E, void* scratch, void* stream) {
  if (T < 0 || K < 1 || E < 1 || E > kSortMaxExperts || T * K >= (int64_t{1} << 31))
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t n = T * K, chunks = (n + kSortChunk - 1) / kSortChunk;
  const cudaStream_t s = as_stream(stream);
  const int e = static_cast<int>(E);
  auto* hist = static_cast<int32_t*>(scratch);
  const size_t smem = static_cast<size_t>(E) * sizeof(int32_t);
  if (chunks > 0) {
    chunk_histogram_kernel<<<static_cast<unsigned>(chunks), 256, smem, s>>>(hist, choices, n, e);
    if (const int rc = launched()) return rc;
  }
  const auto scan_threads = static_cast<unsigned>((E + 31) / 32 * 32);
  sort_scan_kernel<<<1, scan_threads, 0, s>>>(expert_offsets, hist, chunks, e);
  if (const int rc = launched()) return rc;
  if (chunks > 0) {
    stable_scatter_kernel<<<static_cast<unsigned>(chunks), 32, smem, s>>>(
        token_index, row_of_assignment, gate_rows, choices, gates, hist, n, K, e);
    return launched();
  }
  return 0;
}

}  // namespace moeforge::kernels::cuda
