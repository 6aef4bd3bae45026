#include "moeforge/routing/topk.h"

#include <cmath>

#include "moeforge/routing/losses.h"
#include "option_checks.h"

namespace moeforge {

TopKRouterImpl::TopKRouterImpl(const MoEConfig& cfg, int64_t d_model)
    : cfg_(cfg), n_expert_(cfg.routed_experts()), k_(cfg.routed_used()) {
  // nn.Linear's default initialisation, U(-1/sqrt(C), 1/sqrt(C)), as in the Mixtral reference.
  const double bound = 1.0 / std::sqrt(double(d_model));
  weight = register_parameter("weight", torch::empty({n_expert_, d_model}).uniform_(-bound, bound));
  if (cfg_.noisy) {
    // W_noise starts at zero (Shazeer 2017), which is not "no noise": the noise std is softplus(0) = ln 2
    // ~ 0.69 for every token and expert until W_noise is learned (docs/routing.md, noisy top-K).
    noise_weight = register_parameter("noise_weight", torch::zeros({n_expert_, d_model}));
  }
  register_expert_mask(n_expert_);
}

TokenScores TopKRouterImpl::score(const torch::Tensor& x, bool training) {
  TokenScores s;
  s.logits = torch::matmul(x, weight.t());  // [T, E]
  torch::Tensor z = s.logits;
  if (cfg_.noisy && training) {
    // z' = z + eps * softplus(x W_noise), eps ~ N(0, 1) (Shazeer 2017 eq. 4); selection and gates on z'.
    auto noise_std = torch::softplus(torch::matmul(x, noise_weight.t()));
    z = z + torch::randn_like(z) * noise_std;
  }
  if (cfg_.score == ScoreFunc::kSoftmax) {
    s.scores = torch::softmax(z, 1);
    s.probs = z.is_same(s.logits) ? s.scores : torch::softmax(s.logits, 1);
  } else {
    s.scores = torch::sigmoid(z);
    auto clean = z.is_same(s.logits) ? s.scores : torch::sigmoid(s.logits);
    s.probs = clean / clean.sum(1, true);  // DeepSeek-V3 normalises sigmoid scores for its balance loss
  }
  return s;
}

RoutingPlan TopKRouterImpl::route(const torch::Tensor& x, const RouteContext& ctx) {
  return route_scores(score(x, ctx.training), torch::Tensor(), ctx);
}

RoutingPlan TopKRouterImpl::route_scores(const TokenScores& s, const torch::Tensor& selection_bias,
                                         const RouteContext& ctx) {
  const int64_t T = s.scores.size(0);
  torch::Tensor choices, gate_tk;  // [T, K]
  // Pruned experts leave the selection only (a -inf bias); the gates keep the unmasked scores, so the
  // other experts' gates do not move (router.h, set_expert_mask).
  torch::Tensor bias;  // [E] or undefined
  if (selection_bias.defined()) bias = selection_bias.to(s.scores.device(), s.scores.scalar_type());
  if (has_pruned()) {
    auto m = selection_mask_bias(s.scores);
    bias = bias.defined() ? bias + m : m;
  }
  if (bias.defined()) {
    choices = std::get<1>((s.scores.detach() + bias).topk(k_, 1));
    gate_tk = s.scores.gather(1, choices);
  } else {
    auto top = s.scores.topk(k_, 1);
    gate_tk = std::get<0>(top);
    choices = std::get<1>(top);
  }
  auto raw_gate = gate_tk.detach();  // [T, K] un-normalised, for priorities and GShard's rule
  // Renormalised over the K chosen (GShard, Mixtral; always for sigmoid scores, DeepSeek-V3), but never a
  // single choice: at K = 1 the gate would be the constant 1 and the router would get no gradient from the
  // task loss. Switch (K = 1) uses g = p; Megatron renormalises only for K > 1 (docs/routing.md, top-K).
  if (k_ > 1 && (cfg_.renormalize || cfg_.score == ScoreFunc::kSigmoid))
    gate_tk = gate_tk / gate_tk.sum(1, true);

  torch::Tensor keep;  // [T, K] bool, undefined = all requested
  if (cfg_.gshard_random_second && ctx.training && k_ >= 2) {
    // GShard (Lepikhin et al. 2020, Algorithm 1): keep the second expert only if 2 * g2 > u, u ~ U(0,1),
    // with g2 normalised over the top two.
    auto g2 = raw_gate.select(1, 1) / (raw_gate.select(1, 0) + raw_gate.select(1, 1));
    keep = torch::ones({T, k_}, torch::kBool);
    keep.select(1, 1).copy_((2.0 * g2 > torch::rand_like(g2)).cpu());
  }
  torch::Tensor priority;
  if (cfg_.overflow == OverflowOrder::kBatchPrioritized && cfg_.capacity_factor > 0)
    priority = raw_gate.select(1, 0);  // Switch/V-MoE BPR: tokens ordered by their top-1 score
  const int64_t cap = expert_capacity(cfg_.capacity_factor, T, k_, n_expert_);
  RoutingPlan plan = build_plan_from_choices(choices, keep, priority, gate_tk, n_expert_, cap);
  // The auxiliary losses only matter where they can be trained on. In inference (no training, no
  // autograd) they would be most of route()'s time at decode sizes: about two thirds of its perf samples
  // at T = 1, where a call takes ~40 us. So there they are 0.
  plan.aux_loss = ctx.training || at::GradMode::is_enabled() ? token_choice_aux_loss(cfg_, s, choices, ctx)
                                                             : torch::zeros({}, s.logits.options());
  return plan;
}

std::string TopKRouterImpl::top_k_obstacle() const {
  if (cfg_.capacity_factor > 0) return "moe.capacity_factor: a capacity drops tokens depending on the batch";
  return {};
}

torch::Tensor TopKRouterImpl::assignment_scores(const torch::Tensor& x, const RoutingPlan& /*plan*/) {
  torch::NoGradGuard ng;
  return score(x, /*training=*/false).scores.detach();
}

torch::Tensor token_choice_aux_loss(const MoEConfig& cfg, const TokenScores& s, const torch::Tensor& choices,
                                    const RouteContext& ctx) {
  auto loss = torch::zeros({}, s.logits.options());
  if (cfg.balance_coef > 0) loss = loss + cfg.balance_coef * switch_balance_loss_global(s.probs, choices);
  if (cfg.seq_balance_coef > 0) {
    const int64_t B = ctx.seq_len > 0 ? s.probs.size(0) / ctx.seq_len : 1;
    loss = loss + cfg.seq_balance_coef * seq_balance_loss(s.probs, choices, B);
  }
  if (cfg.z_loss_coef > 0) loss = loss + cfg.z_loss_coef * router_z_loss(s.logits);
  return loss;
}

RouterSpec topk_router_spec() {
  RouterSpec r;
  r.name = "topk";
  r.summary =
      "token-choice top-K: Switch (K=1), GShard (K=2), Mixtral, noisy, sigmoid (docs/routing.md section 1)";
  r.make = [](const MoEConfig& cfg, int64_t d_model) {
    return std::make_shared<TopKRouterImpl>(cfg, d_model);
  };
  r.equal_compute = option_checks::same_k;
  return r;
}

}  // namespace moeforge
