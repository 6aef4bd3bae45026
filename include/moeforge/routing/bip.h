// BIP balancing (Sun 2025, arXiv 2502.15451; docs/routing.md section 4): token-choice top-K of (s - q) where
// q [E] is the expert part of the LP dual of the balanced assignment problem
//   max sum s_te x_te  s.t.  sum_e x_te = K,  sum_t x_te <= cap_e = ceil(K T / E),  x in {0, 1}.
// Legend: T tokens, E experts, K experts per token.
#pragma once

#include "moeforge/routing/topk.h"

namespace moeforge {

// cap_e = ceil(K T / E): the balanced capacity (the ceiling keeps the problem feasible when E does not
// divide K T).
int64_t bip_capacity(int64_t n_tokens, int64_t k, int64_t n_expert);

// n_iter dual coordinate steps from q (updated in place), scores s [T, E] (detached):
//   p_t = max(0, (K+1)-th largest over e of (s_te - q_e))
//   q_e = max(0, (cap+1)-th largest over t of (s_te - p_t))
// with the midpoint tie rule of bip.cpp (each "(K+1)-th largest" is the midpoint of the K-th and
// (K+1)-th). Order statistics are partial selections (kthvalue), O(T E) per iteration.
void bip_dual_iterations(torch::Tensor& q, const torch::Tensor& s, int64_t k, int64_t cap, int64_t n_iter);

class BipRouterImpl : public TopKRouterImpl {
 public:
  // As loss-free, the balance-loss terms of cfg are dropped; the z-loss stays.
  BipRouterImpl(const MoEConfig& cfg, int64_t d_model);

  // Causal (default): top-K of (s - q) with the q of the previous step; plan.scores = s for after_step.
  // Solve (NON-CAUSAL, analysis): first iterate q on this batch, then route it with that q.
  RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) override;
  // bip_iters dual iterations on the scores of the step just trained (all its micro-batches): the q of the
  // next step (causal), or the warm start of the next solve (solve mode).
  void after_step(const RouteFeedback& feedback) override;
  std::string name() const override { return mode_ == BipMode::kCausal ? "bip" : "bip(solve: non-causal)"; }
  bool causal() const override { return mode_ == BipMode::kCausal && TopKRouterImpl::causal(); }
  nlohmann::json describe_state() const override;
  nlohmann::json trace_fields(const RoutingPlan& plan, int64_t token,
                              const std::vector<int64_t>& experts) const override;  // the dual of its experts
  // Top-K only in causal mode with a zero dual q.
  std::string top_k_obstacle() const override;

  torch::Tensor q;  // [E] buffer: the expert dual, init 0

 private:
  BipMode mode_;
  int64_t n_iter_;
};
TORCH_MODULE(BipRouter);

// Its registry row: "bip", moe.bip_iters and moe.bip_mode (bip_options.h).
RouterSpec bip_router_spec();

}  // namespace moeforge
