// Expert-choice routing (Zhou et al., NeurIPS 2022, arXiv 2202.09368; docs/routing.md section 2): every
// expert picks its k_e = round(T * CF / E) highest-scoring tokens, so a token gets 0..E experts.
//
// Legend: B sequences, S positions, T = B*S tokens, C model width, E experts.
#pragma once

#include "moeforge/routing/moe_config.h"
#include "moeforge/routing/registry.h"
#include "moeforge/routing/router.h"

namespace moeforge {

// Builds a plan from a selection mask: assignments grouped by expert, ascending token order inside an
// expert (nonzero() of the [E, T] transpose is already in that order, so no sort is needed).
//   mask   [T, E] bool
//   scores [T, E] differentiable gate source: gate of (t, e) = scores[t, e]
RoutingPlan build_plan_from_mask(const torch::Tensor& mask, const torch::Tensor& scores);

// The per-position capacity of causal-safe EC for expert e: with c = B * CF / E tokens per expert per
// position and the phase phi_e = (e + 1/2) / E, position p gets floor((p+1) c + phi_e) - floor(p c + phi_e).
// It depends on p, e, B and CF only (never on the tokens). Over S positions expert e takes
// floor(S c + phi_e), i.e. floor or ceil of S c; at one position the E experts together take floor or ceil
// of B * CF, so every position is served whenever B * CF >= 1 (a phase shared by all experts left whole
// positions empty: B = 3, E = 8, CF = 2 served no token at positions 2 and 6).
int64_t ec_position_capacity(int64_t p, int64_t e, int64_t n_seq, double capacity_factor, int64_t n_expert);
// k_e = round(T * CF / E), half away from zero.
int64_t ec_capacity(int64_t n_tokens, double capacity_factor, int64_t n_expert);

class ExpertChoiceRouterImpl : public Router {
 public:
  ExpertChoiceRouterImpl(const MoEConfig& cfg, int64_t d_model);

  // Training: batch routing (ec_mode causal / noncausal) or threshold routing (ec_mode threshold).
  // Evaluation: threshold routing unless ec_eval = batch (then the training grouping). route() never
  // changes the router's state: the thresholds are calibrated in after_step from plan.scores.
  RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) override;
  // Threshold calibration: EMA of each expert's k_e-th largest score of the step just trained (all its
  // micro-batches, k_e from their total token count).
  void after_step(const RouteFeedback& feedback) override;
  int64_t n_expert() const override { return n_expert_; }
  std::string name() const override;
  // Causal-safe and threshold routing are causal; non-causal batch routing is not, and neither is
  // evaluation with ec_eval = batch unless its rows are independent sequences (docs/routing.md).
  bool causal() const override { return cfg_.expert_choice.mode != ECMode::kNonCausal; }
  torch::Tensor assignment_scores(const torch::Tensor& x, const RoutingPlan& plan) override;
  nlohmann::json describe_state() const override;
  nlohmann::json trace_fields(const RoutingPlan& plan, int64_t token,
                              const std::vector<int64_t>& experts) const override;  // thresholds, scores

  // The evaluation routing can be switched without rebuilding (an evaluator reports both losses): "batch"
  // (the training grouping) and "threshold", unless the router trains with thresholds (one routing).
  std::vector<std::string> eval_routings() const override;
  std::string eval_routing() const override { return to_string(eval_routing_); }
  void set_eval_routing(const std::string& routing) override;
  void set_eval_routing(ECEval v) { eval_routing_ = v; }
  ECMode config_mode() const { return cfg_.expert_choice.mode; }  // moe.ec_mode: how it routes in training

  // The three routings from scores s [T, E] (softmax), usable directly by tests and analysis.
  torch::Tensor select_noncausal(const torch::Tensor& s) const;              // [T, E] bool
  torch::Tensor select_causal(const torch::Tensor& s, int64_t n_seq) const;  // [T, E] bool
  torch::Tensor select_threshold(const torch::Tensor& s) const;              // [T, E] bool

  torch::Tensor weight;           // [E, C] router projection (nn.Linear layout)
  torch::Tensor threshold;        // [E] buffer: calibrated score threshold per expert
  torch::Tensor threshold_steps;  // [] int64 buffer: calibration updates so far (0 = uncalibrated)

 private:
  MoEConfig cfg_;
  int64_t n_expert_;
  ECEval eval_routing_;
};
TORCH_MODULE(ExpertChoiceRouter);

// Its registry row: "expert_choice", the moe.ec_* keys (expert_choice_options.h).
RouterSpec expert_choice_router_spec();

}  // namespace moeforge
