#include "moeforge/routing/losses.h"

#include "moeforge/dist/dist.h"

namespace moeforge {

namespace {
// [B, E] share of each row-group's choices that went to each expert (no gradient: counts).
torch::Tensor choice_share(const torch::Tensor& choices, int64_t n_group, int64_t n_expert,
                           torch::ScalarType dtype) {
  const int64_t T = choices.size(0), K = choices.size(1);
  const int64_t S = T / n_group;
  auto idx = choices.reshape({n_group, S * K});                                     // [B, S*K]
  auto counts = torch::zeros({n_group, n_expert}, choices.options().dtype(dtype));  // [B, E]
  counts.scatter_add_(1, idx, torch::ones(idx.sizes(), counts.options()));
  return counts / double(S * K);
}
}  // namespace

torch::Tensor switch_balance_loss(const torch::Tensor& probs, const torch::Tensor& choices) {
  const int64_t E = probs.size(1);
  auto f = choice_share(choices.to(probs.device()), 1, E, probs.scalar_type()).squeeze(0);  // [E]
  auto P = probs.mean(0);                                                                   // [E]
  return double(E) * (f * P).sum();
}

torch::Tensor switch_balance_loss_global(const torch::Tensor& probs, const torch::Tensor& choices) {
  if (!dist::global_batch()) return switch_balance_loss(probs, choices);
  const int64_t E = probs.size(1), T = choices.size(0), K = choices.size(1);
  auto idx = choices.to(torch::kCPU, torch::kLong).reshape({-1});
  auto counts = torch::zeros({E + 1}, torch::kDouble);  // [E] choices per expert, then T
  counts.narrow(0, 0, E).index_add_(0, idx, torch::ones({T * K}, torch::kDouble));
  counts[E] = double(T);
  std::vector<torch::Tensor> c{counts};
  dist::allreduce_sum(c, "the balance loss's expert counts");
  const double T_global = c[0][E].item<double>();
  auto f = (c[0].narrow(0, 0, E) / (T_global * double(K))).to(probs.device(), probs.scalar_type());  // [E]
  auto P = probs.mean(0);  // [E] this rank's
  return double(E) * (f * P).sum();
}

torch::Tensor seq_balance_loss(const torch::Tensor& probs, const torch::Tensor& choices, int64_t n_seq) {
  const int64_t T = probs.size(0), E = probs.size(1);
  TORCH_CHECK(n_seq >= 1 && T % n_seq == 0, "seq_balance_loss: T = ", T, " is not a multiple of B = ", n_seq);
  auto f = choice_share(choices.to(probs.device()), n_seq, E, probs.scalar_type());  // [B, E]
  auto P = probs.reshape({n_seq, T / n_seq, E}).mean(1);                             // [B, E]
  return double(E) * (f * P).sum(1).mean();
}

torch::Tensor router_z_loss(const torch::Tensor& logits) {
  return torch::logsumexp(logits, 1).pow(2).mean();
}

}  // namespace moeforge
