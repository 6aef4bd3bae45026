// Routing measures of ROUTING.md section 9 beyond the per-batch RoutingStats: MaxVio over steps and over an
// evaluation set, domain specialisation, the optimality gap against the exact balanced assignment, and
// the causal-leak perturbation measure.
//
// Legend: B sequences, S positions, T = B*S tokens, C model width, E experts, K experts per token,
// D domain labels.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

#include "moeforge/routing/router.h"

namespace moeforge {

class MoELayerImpl;

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
// the optimum vertex is integral (ROUTING.md section 4). scores: [T, E].
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

// Causal leak (ROUTING.md section 2): runs forward on x [B, S, C] and on a copy whose sequence `seq` is
// replaced after position `pos` by `replacement` ([S-pos-1, C]; if undefined, fresh N(0, 3^2) rows), and
// returns max |y' - y| over that sequence's positions 0..pos. 0 (up to float noise) for a causal router.
double causal_leak(const std::function<torch::Tensor(const torch::Tensor&)>& forward, const torch::Tensor& x,
                   int64_t seq, int64_t pos, torch::Tensor replacement = {});
// The same for an MoE layer (its output y), in the layer's current train/eval mode.
double causal_leak(MoELayerImpl& layer, const torch::Tensor& x, int64_t seq, int64_t pos,
                   torch::Tensor replacement = {});

}  // namespace moeforge
