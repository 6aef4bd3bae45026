// Causal softmax attention of one head, forward and backward, on raw row-major float arrays
// (docs/performance.md, "Fused attention"). S positions, head width D; query i attends to keys 0..i.
// The glue (src/model/attention_core.cpp) runs one call per (sequence, head) across threads.
#pragma once

#include <cstdint>

namespace moeforge::kernels::cpu {

// q, k, v, out [S, D]; p [S, S] gets the attention probabilities (row i: softmax over j <= i of
// scale * q_i . k_j, zeros after i); kt is scratch [D, S].
void causal_attention_forward(const float* q, const float* k, const float* v, float* p, float* out, float* kt,
                              int64_t S, int64_t D, float scale);

// From dout [S, D] and the forward's p: dq, dk, dv [S, D] (overwritten). Scratch: D * S + S * S floats.
void causal_attention_backward(const float* q, const float* k, const float* v, const float* p,
                               const float* dout, float* dq, float* dk, float* dv, float* scratch, int64_t S,
                               int64_t D, float scale);

}  // namespace moeforge::kernels::cpu
