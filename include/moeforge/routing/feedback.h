// What one optimiser step teaches a router: the plans of every micro-batch routed in that step, with the
// measured expert health and the per-token training loss, summed (docs/routing.md, "State updates").
//
// The layer adds each training forward's plan (add_plan) and the health of its experts (add_health); the
// trainer adds each micro-batch's per-token loss (add_token_loss). Router::after_step then sees the whole
// step's data, so gradient accumulation over n micro-batches of B sequences updates loss-free bias, BIP's
// dual, EC thresholds, reliabilities and sequence centroids exactly as one batch of n*B would.
//
// Legend: E experts, T_i tokens of micro-batch i, B_i its sequences, C model width.
#pragma once

#include <torch/torch.h>

#include <vector>

namespace moeforge {

struct RoutingPlan;

struct RouteFeedback {
  int64_t micro_batches = 0;
  int64_t n_tokens = 0;               // sum of T_i
  std::vector<int64_t> load;          // [E] kept assignments summed over micro-batches
  std::vector<int64_t> group_load;    // [G] kept (token, group) pairs summed (routers with two stages)
  std::vector<torch::Tensor> scores;  // per micro-batch plan.scores [T_i, E], when the router set them
  // Per micro-batch, its plan's sequence_rows (RoutingPlan::sequence_rows: [B_i, ...] tensors in an order
  // the router defines), when the router set them.
  std::vector<std::vector<torch::Tensor>> sequence_rows;
  // Expert health, summed over micro-batches (only when the layer measured it).
  bool has_health = false;
  std::vector<double> out_sum_sq;  // [E] sum over rows of the squared output RMS-numerator
  std::vector<int64_t> out_rows;   // [E] output rows measured
  std::vector<int64_t> nonfinite;  // [E] rows with a NaN or Inf
  // Per-token training loss, summed per expert over the tokens it served, and over all tokens.
  bool has_loss = false;
  std::vector<double> expert_loss_sum;     // [E] (non-finite losses are counted in expert_loss_bad)
  std::vector<int64_t> expert_loss_count;  // [E] finite losses
  std::vector<int64_t> expert_loss_bad;    // [E] non-finite losses
  double loss_sum = 0;                     // finite token losses
  int64_t loss_count = 0;

  bool empty() const { return micro_batches == 0; }
  void clear() { *this = RouteFeedback(); }
  // The plan of one training forward (its loads, scores and sequence data).
  void add_plan(const RoutingPlan& plan);
  // Output RMS [E] and non-finite row counts [E] of that forward's experts; rows are the plan's loads.
  void add_health(const RoutingPlan& plan, const torch::Tensor& out_rms, const torch::Tensor& nonfinite);
  // token_loss [T] of the forward whose plan is `plan`.
  void add_token_loss(const RoutingPlan& plan, const torch::Tensor& token_loss);

  torch::Tensor all_scores() const;  // [sum T_i, E] the scores of the whole step, in routing order
  // Item `item` of every micro-batch's sequence rows, concatenated in routing order [sum B_i, ...];
  // undefined when the plans carried none.
  torch::Tensor all_sequence_rows(size_t item) const;
  // Per-expert output RMS of the whole step (0 for an idle expert), from the summed squares.
  std::vector<double> out_rms() const;
};

// Data parallelism (docs/distributed.md): makes one step's feedback that of the global batch, on every
// rank. Per-expert loads, health and loss sums are summed over ranks; each micro-batch's scores and
// sequence rows become the concatenation of every rank's rows in rank order, i.e. the rows of that
// micro-batch of the global batch (each rank holds a contiguous slice of it, rank 0 first). A stateful
// router's after_step then updates its state exactly as one process with the whole global batch would,
// and identically on every rank. A no-op in one process.
void globalize_feedback(RouteFeedback& fb);

}  // namespace moeforge
