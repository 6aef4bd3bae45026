// Routing on the GPU: the fused top-K softmax router and the expert-aligned counting sort that turns the
// choices into the layout of src/routing/plan.cpp (assignments grouped by expert, stable in token order).
// Raw device pointers, asynchronous on `stream`, return codes as in types.h; no CUDA include.
// Legend: T tokens, E experts, K choices per token, N = T * K assignments.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/types.h"

namespace moeforge::kernels::cuda {

// Limits of topk_softmax: one warp per token holds the E scores in registers, one lane per choice.
constexpr int64_t kTopKMaxExperts = 256;
constexpr int64_t kTopKMaxK = 32;

// For every token t < T, from logits [T, E] (float32 math for either input type):
//   probs[t, :]   = softmax(logits[t, :])  (written when probs != nullptr; the Switch balance loss needs it)
//   ids[t, k]     = the expert of the k-th largest probability, k < K, in descending order
//   gates[t, k]   = that probability, divided by the sum of the K selected ones when renormalize
// Ties: equal probabilities are taken in ascending expert id (a total order, so the result is unique;
// torch.topk on CPU does not promise an order for ties). A NaN probability ranks below every number, so
// ids are always K distinct experts in [0, E). Needs 1 <= K <= min(E, kTopKMaxK), E <= kTopKMaxExperts,
// else returns cudaErrorInvalidValue. exp is expf (not __expf): the router is tiny next to the experts.
int topk_softmax(float* probs, float* gates, int32_t* ids, const float* logits, int64_t T, int64_t E,
                 int64_t K, bool renormalize, void* stream);
int topk_softmax(float* probs, float* gates, int32_t* ids, const bf16* logits, int64_t T, int64_t E,
                 int64_t K, bool renormalize, void* stream);

// Backward of topk_softmax to the logits, for token t (float32):
//   d_p[e]  = d_probs[t, e] (0 when d_probs == nullptr; e.g. the balance loss's gradient)
//             + for the selected experts: renormalize ? (d_gates[t, k] - sum_j d_gates[t, j] gates[t, j]) / S
//                                                      : d_gates[t, k],   S = sum_k probs[t, ids[t, k]]
//   d_logits[t, e] = probs[t, e] (d_p[e] - sum_j probs[t, j] d_p[j])
// The selection itself has no gradient. Same limits as topk_softmax.
int topk_softmax_backward(float* d_logits, const float* d_gates, const float* d_probs, const float* probs,
                          const float* gates, const int32_t* ids, int64_t T, int64_t E, int64_t K,
                          bool renormalize, void* stream);

// Scratch bytes that expert_counting_sort needs for N assignments and E experts (per-chunk histograms:
// ceil(N / kSortChunk) * E int32).
constexpr int64_t kSortChunk = 512;
constexpr int64_t kSortMaxExperts = 1024;
size_t expert_sort_scratch_bytes(int64_t n_assign, int64_t n_expert);

// Counting sort of the choices [T, K] (int32 expert ids) by expert, stable in flat order p = t * K + k:
//   expert_offsets [E + 1]: expert e owns rows expert_offsets[e] .. expert_offsets[e + 1]
//   token_index [N]: the token (p / K) of each row, rows grouped by expert, ascending p inside an expert
//   row_of_assignment [N]: the row of assignment p (the inverse map; -1 for an id outside [0, E))
//   gate_rows [N]: gate_rows[row] = gates[p] (skipped when gate_rows or gates is nullptr)
// This is the layout of build_plan_from_choices (src/routing/plan.cpp) in the dropless case. Ids outside
// [0, E) are left out: the caller sees expert_offsets[E] < N. Three launches: per-chunk histograms with
// shared-memory atomics, one block that scans them (offsets plus each chunk's base per expert), and one warp
// per chunk that ranks equal ids inside each group of 32 with __match_any_sync (stable, no O(N E) work).
// Needs E <= kSortMaxExperts and N < 2^31, else cudaErrorInvalidValue; scratch: expert_sort_scratch_bytes.
int expert_counting_sort(int64_t* expert_offsets, int64_t* token_index, int64_t* row_of_assignment,
                         float* gate_rows, const int32_t* choices, const float* gates, int64_t T, int64_t K,
                         int64_t E, void* scratch, void* stream);

}  // namespace moeforge::kernels::cuda
