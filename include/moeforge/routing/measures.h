// Routing measures of docs/routing.md section 9 beyond the per-batch RoutingStats: MaxVio over steps and over
// an evaluation set, domain specialisation, the optimality gap against the exact balanced assignment, and the
// causal-leak perturbation measure.
//
// Legend: B sequences, S positions, T = B*S tokens, C model width, E experts, K experts per token,
// D domain labels.
#pragma once

#include <algorithm>

#include <torch/torch.h>

#include <functional>
#include <vector>

#include "moeforge/routing/router.h"

namespace moeforge {

// MaxVio_batch (each batch's MaxVio, averaged over batches) and MaxVio_global (the MaxVio of the loads
// summed over every batch added, e.g. a whole evaluation set), per layer and averaged over layers.
class MaxVioAccumulator {
 public:
  MaxVioAccumulator(int64_t n_layer, int64_t n_expert);
  // One batch's per-expert load of one layer (RoutingStats::load).
  void add(int64_t layer, const std::vector<int64_t>& load);
  double batch(int64_t layer) const;   // mean over the batches added to `layer`
  double global(int64_t layer) const;  // MaxVio of the summed load of `layer`
  double batch_mean() const;           // averaged over layers
  double global_mean() const;          // averaged over layers
  int64_t n_batches(int64_t layer) const { return n_batch_[layer]; }

 private:
  std::vector<std::vector<double>> total_;  // [L][E]
  std::vector<double> batch_sum_;           // [L]
  std::vector<int64_t> n_batch_;            // [L]
};

// Adds a plan's assignments to counts [D, E] (int64), token t having domain token_domain[t] ([T] int64).
void add_domain_counts(torch::Tensor& counts, const RoutingPlan& plan, const torch::Tensor& token_domain);

struct Specialisation {
  double mi_over_h = 0;        // I(domain; expert) / H(domain), in [0, 1]; 0 when H(domain) = 0
  std::vector<double> purity;  // [E] max_d n_de / sum_d n_de (0 for an expert with no assignment)
};
// From counts [D, E] of (domain, expert) assignments over an evaluation set.
Specialisation domain_specialisation(const torch::Tensor& counts);

// The exact balanced optimum max sum s x s.t. sum_e x_te = K, sum_t x_te <= cap, x in [0, 1], solved as an
// LP by GLPK's simplex; the constraint matrix is a bipartite transportation matrix (totally unimodular), so
// the optimum vertex is integral (docs/routing.md section 4). scores: [T, E].
struct BalancedOptimum {
  torch::Tensor x;  // [T, E] float64 in {0, 1}
  double objective = 0;
};
BalancedOptimum solve_balanced_assignment(const torch::Tensor& scores, int64_t k, int64_t cap);

struct OptimalityGap {
  double optimum = 0;             // sum s x_opt
  double router_objective = 0;    // sum s x_router over the plan's assignments
  double gap = 0;                 // (optimum - router_objective) / optimum (negative if the router overfills)
  double capacity_violation = 0;  // max_e max(0, load_e - cap) / cap
};
// scores [T, E]: the scores the objective is measured on (the router's s); plan: the router's assignments.
OptimalityGap optimality_gap(const torch::Tensor& scores, const RoutingPlan& plan, int64_t k, int64_t cap);

// Causal leak (docs/routing.md section 9): does any output at a position <= p depend on an input at a
// position > p? For each trial (a probed sequence b, a cut point p, a random replacement), the inputs after
// p are replaced, either in row b alone ("same row") or in every row but b ("other rows"), and the outputs
// of every row at positions 0..p are compared with the unperturbed pass. The RNG is reseeded identically
// before both passes of a trial, so a noisy router draws the same noise in both and its noise is not
// mistaken for a leak. 0 (up to float noise) for a causal router.
struct LeakOptions {
  int64_t sequences = 3;                         // probed rows: the first min(sequences, B)
  std::vector<double> cuts = {0.25, 0.5, 0.75};  // cut points p as fractions of S (p = floor(f * (S-1)))
  int64_t draws = 2;                             // random replacements per (row, cut)
  bool other_rows = true;                        // also perturb the other rows' futures
  double scale = 3.0;                            // replacements are N(0, scale^2) rows
  uint64_t seed = 0;                             // replacements and the reseeded router RNG
};
struct LeakResult {
  double same_row = 0;    // max |y' - y| over positions <= p when only row b's future changed
  double other_rows = 0;  // the same when the other rows' futures changed
  int64_t trials = 0;
  double max() const { return std::max(same_row, other_rows); }
};
LeakResult causal_leak(const std::function<torch::Tensor(const torch::Tensor&)>& forward,
                       const torch::Tensor& x, const LeakOptions& opt = {});
// (The same for an MoE layer: causal_leak(MoELayerImpl&, ...) in layer/moe_layer.h.)

}  // namespace moeforge
