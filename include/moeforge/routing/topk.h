// Token-choice top-K routing (docs/routing.md section 1): Switch (K=1), GShard (K=2, random second expert),
// Mixtral (softmax, renormalised), noisy top-K (Shazeer 2017), sigmoid scores (DeepSeek-V3).
#pragma once

#include "moeforge/routing/moe_config.h"
#include "moeforge/routing/registry.h"
#include "moeforge/routing/router.h"

namespace moeforge {

// Per-token scores of a token-choice router, before any balancing bias.
struct TokenScores {
  torch::Tensor logits;  // [T, E] z = x W_r^T (noise-free)
  torch::Tensor scores;  // [T, E] s = softmax(z) or sigmoid(z), the gate source (noisy in training if on)
  torch::Tensor probs;   // [T, E] the distribution used by balance losses (sigmoid scores normalised)
};

class TopKRouterImpl : public Router {
 public:
  TopKRouterImpl(const MoEConfig& cfg, int64_t d_model);

  RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) override;
  int64_t n_expert() const override { return n_expert_; }
  std::string name() const override { return "topk"; }
  // Capacity-limited routing (capacity_factor > 0) is not causal: a token's second choice competes with
  // later tokens' first choices (GShard's order), and with batch-prioritised overflow with every token.
  bool causal() const override { return cfg_.capacity_factor <= 0; }
  // Plain top-K when dropless (noise and GShard's random second expert act in training only).
  std::string top_k_obstacle() const override;
  // The clean (noise-free) scores s, without any selection bias.
  torch::Tensor assignment_scores(const torch::Tensor& x, const RoutingPlan& plan) override;

  // Scores of x (noise added when cfg.noisy and training).
  TokenScores score(const torch::Tensor& x, bool training);
  // Route from given scores with an optional selection bias [E] (loss-free balancing, BIP dual): selection
  // is the top-K of (scores + bias), gates come from the scores alone.
  RoutingPlan route_scores(const TokenScores& s, const torch::Tensor& selection_bias,
                           const RouteContext& ctx);

  const MoEConfig& config() const { return cfg_; }

  torch::Tensor weight;        // [E, C] router projection (nn.Linear layout)
  torch::Tensor noise_weight;  // [E, C] noise projection, only when cfg.noisy

 private:
  int64_t min_active_experts() const override { return k_; }  // every token needs K experts
  MoEConfig cfg_;
  int64_t n_expert_, k_;
};
TORCH_MODULE(TopKRouter);

// Its registry row: "topk" (the common token-choice keys of moe_config.h; no keys of its own).
RouterSpec topk_router_spec();

// The aux loss of a token-choice router: balance (Switch), sequence-wise balance and z-loss terms with
// their coefficients from cfg. choices: [T, K] experts chosen before capacity.
torch::Tensor token_choice_aux_loss(const MoEConfig& cfg, const TokenScores& s, const torch::Tensor& choices,
                                    const RouteContext& ctx);

}  // namespace moeforge
