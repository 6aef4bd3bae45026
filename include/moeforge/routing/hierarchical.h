// Hierarchical cluster routing (ClusterMoE, docs/routing.md section 5): a cluster router picks K_c of G
// clusters, then each selected cluster's own expert router picks K_e of its E/G experts. Gate = p(cluster) *
// p(expert | cluster). Reliability (EMA of measured expert health) biases both stages by log r; balance
// losses at both levels; a diversity loss on the router rows inside a cluster; an optional adaptive output
// weight a(x) = sigmoid(w.x); expert pruning masks; utilisation / reliability summaries.
//
// Legend: T tokens, C model width, E experts, G clusters, Eg = E/G experts per cluster, K_c clusters per
// token, K_e experts per selected cluster, N assignments.
#pragma once

#include <nlohmann/json.hpp>

#include <vector>

#include "moeforge/routing/moe_config.h"
#include "moeforge/routing/registry.h"
#include "moeforge/routing/router.h"

namespace moeforge {

// Utilisation and reliability of one hierarchical router (one layer). Loads are the counts accumulated
// in training since the last reset_counters(); shares are of the total.
struct ExpertSummary {
  int64_t id = 0;  // global expert id; cluster = id / Eg
  double load = 0, share = 0, reliability = 1;
  bool pruned = false;
};
struct ClusterSummary {
  int64_t id = 0;
  double load = 0, share = 0, reliability = 1;
  std::vector<ExpertSummary> experts;
};
struct HierarchicalSummary {
  std::vector<ClusterSummary> clusters;
  double max_vio_expert = 0, max_vio_cluster = 0;  // MaxVio of the accumulated loads
  nlohmann::json to_json() const;
};

class HierarchicalRouterImpl : public Router {
 public:
  HierarchicalRouterImpl(const MoEConfig& cfg, int64_t d_model);

  RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) override;
  // Utilisation counters and the reliability update from the measured health of the step's experts (see
  // the .cpp for the signal).
  void after_step(const RouteFeedback& feedback) override;
  bool wants_expert_health() const override { return true; }
  int64_t n_expert() const override { return n_expert_; }
  std::string name() const override { return "hierarchical"; }
  // Capacity at either level makes a token's assignment depend on other tokens' choices (section 1).
  bool causal() const override {
    return cfg_.capacity_factor <= 0 && cfg_.hierarchical.cluster_capacity_factor <= 0;
  }
  torch::Tensor assignment_scores(const torch::Tensor& x, const RoutingPlan& plan) override;
  nlohmann::json describe_state() const override;  // {"summary": summary().to_json(), ...}
  nlohmann::json trace_fields(const RoutingPlan& plan, int64_t token,
                              const std::vector<int64_t>& experts) const override;  // clusters, reliabilities
  int64_t n_cluster() const { return n_cluster_; }

  // Mean pairwise cosine similarity of the router rows of the experts inside each cluster, averaged over
  // clusters (without its coefficient). Differentiable in expert_weight.
  torch::Tensor diversity_loss() const;

  // Pruning: removes experts from routing (their logits become -inf; a cluster whose experts are all
  // pruned is never selected). The mask is a buffer, so a pruned checkpoint keeps it.
  void set_pruned(const std::vector<int64_t>& experts);
  std::vector<int64_t> pruned() const;
  // The Router pruning interface over the same "expert_active" buffer (set_pruned semantics).
  void set_expert_mask(const torch::Tensor& active) override;
  torch::Tensor expert_mask() const override { return expert_active.to(torch::kCPU, torch::kFloat).clone(); }

  HierarchicalSummary summary() const;
  void reset_counters() override;

  torch::Tensor cluster_weight;       // [G, C] stage-1 router
  torch::Tensor expert_weight;        // [G, Eg, C] stage-2 router of each cluster
  torch::Tensor adaptive_weight;      // [C] w of a(x) = sigmoid(w.x), only when cfg.adaptive_weight
  torch::Tensor expert_reliability;   // [E] buffer, r in (0, 1]
  torch::Tensor cluster_reliability;  // [G] buffer
  torch::Tensor expert_active;        // [E] buffer, 1 = routable, 0 = pruned
  torch::Tensor expert_count;         // [E] buffer (float64): assignments kept in training since
                                      // reset_counters() (after_step adds each step's load)
  torch::Tensor cluster_count;        // [G] buffer (float64): (token, cluster) pairs kept

 private:
  MoEConfig cfg_;
  int64_t n_expert_, n_cluster_, n_per_cluster_, k_cluster_, k_expert_;
};
TORCH_MODULE(HierarchicalRouter);

// Its registry row: "hierarchical", moe.n_cluster_used, moe.reliability* and the rest of
// hierarchical_options.h.
RouterSpec hierarchical_router_spec();

}  // namespace moeforge
