// The core of causal self-attention, softmax(q k^T / sqrt(D) + causal mask) v, in two implementations with
// the same function (docs/performance.md, "Fused attention"):
//  - causal_attention: a fused CPU forward and backward (kernels/cpu/attention.cpp), one pass per
//    (sequence, head) across threads, that computes only the causal half of the scores and keeps only the
//    probabilities for backward;
//  - causal_attention_reference: its plain twin in LibTorch ops (matmul, mask, softmax, matmul), with
//    autograd's backward, which also takes a KV cache's past positions.
// Under train.precision = "bf16" (layer/precision.h) causal_attention runs the reference's two products with
// bf16 operands, the mask and softmax in float32 (docs/performance.md, "bf16 training").
#pragma once

#include <torch/torch.h>

namespace moeforge {

// q, k, v [B, H, S, D] (any strides; float on the CPU, else the reference runs). Returns [B, H, S, D].
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);

// q [B, H, S, D] at positions past..past+S-1; k, v [B, H, past + S, D]. Query i sees keys 0..past + i.
torch::Tensor causal_attention_reference(const torch::Tensor& q, const torch::Tensor& k,
                                         const torch::Tensor& v, int64_t past = 0);

}  // namespace moeforge
