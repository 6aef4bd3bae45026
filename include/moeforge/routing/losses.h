// Auxiliary router losses of docs/routing.md section 8. Each returns the loss without its coefficient.
//
// Legend: T tokens, E experts, K choices per token, B sequences of S positions (T = B*S).
#pragma once

#include <torch/torch.h>

namespace moeforge {

// Switch balance loss E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4; GShard). probs: [T, E] the full score
// distribution over all experts (never only the selected logits, whose softmax is constant). choices:
// [T, K] int64 the experts chosen before capacity; f_e = share of the T*K choices that went to e.
torch::Tensor switch_balance_loss(const torch::Tensor& probs, const torch::Tensor& choices);

// The same with f_e over the global batch of a data-parallel training step (Megatron's global-batch
// balance, docs/distributed.md "What is global"): inside a dist::GlobalBatchScope the choice counts and the
// token count are summed over ranks, P_e stays this rank's, so the mean over ranks of the loss and of its
// gradient is the Switch loss of the whole global batch. Elsewhere exactly switch_balance_loss. Every rank
// must make the same calls (it is a collective).
torch::Tensor switch_balance_loss_global(const torch::Tensor& probs, const torch::Tensor& choices);

// Sequence-wise balance loss (DeepSeek-V3 eq. 17-20): the Switch loss per sequence, averaged over the B
// sequences. probs [T, E], choices [T, K], T = n_seq * seq_len.
torch::Tensor seq_balance_loss(const torch::Tensor& probs, const torch::Tensor& choices, int64_t n_seq);

// Router z-loss (ST-MoE, Zoph et al. 2022 eq. 5): mean_t (logsumexp_e z_te)^2, over logits [T, E].
torch::Tensor router_z_loss(const torch::Tensor& logits);

}  // namespace moeforge
