// MoCE dual-stage routing (Eo et al., EMNLP 2025, arXiv 2509.10513; ROUTING.md section 6).
// Stage 1, per sequence: a cluster id c in {0..G-1}, given by the caller (offline clustering,
// ctx.seq_cluster) or assigned online to the nearest centroid (cosine) of the sequence's mean-pooled,
// stop-gradient input. Stage 2, per token: top-K inside cluster c's group of Eg experts with cluster c's own
// router. Optional general experts (the last moce_n_general of the E experts) with a cluster-independent
// router are added to every token.
//
// Legend: B sequences of S positions, T = B*S tokens, C model width, E experts, G clusters,
// Eg = (E - n_general) / G experts per group, K experts per token inside the group.
#pragma once

#include "moeforge/config/moe_config.h"
#include "moeforge/routing/router.h"

namespace moeforge {

class MoCERouterImpl : public Router {
 public:
  MoCERouterImpl(const MoEConfig& cfg, int64_t d_model);

  RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) override;
  // Online clustering: centroids move toward the mean of the sequences assigned to them since the last
  // step (an EMA with moe.centroid_decay).
  void after_step(const RoutingPlan& plan) override;
  int64_t n_expert() const override { return n_expert_; }
  std::string name() const override { return "moce"; }

  // Nearest centroid (cosine) of each row of pooled [B, C]; only initialised centroids compete (all ids 0
  // if none is initialised yet).
  torch::Tensor assign(const torch::Tensor& pooled) const;  // -> [B] int64 (CPU)
  // Training-time assignment: nearest centroid under a capacity of ceil(B / G) sequences per cluster.
  torch::Tensor assign_balanced(const torch::Tensor& unit) const;  // unit [B, C] from embed() -> [B]
  // The clustering space: pooled [B, C] centred on the running mean of pooled vectors, rows of norm 1.
  torch::Tensor embed(const torch::Tensor& pooled) const;
  // Global id of local expert j of group g.
  int64_t group_expert(int64_t g, int64_t j) const { return g * n_per_group_ + j; }
  int64_t n_per_group() const { return n_per_group_; }
  int64_t n_cluster() const { return n_cluster_; }

  // Offline clustering (ROUTING.md section 6): centroids [G, C] from spherical k-means on this router's own
  // representation (the mean-pooled input of the first MoE layer), and the sequences behind each, so that
  // an unseen sequence's nearest centroid is the cluster its training neighbours had. Rows are normalised.
  // `mean` [C], when given, is the vector the clustering space was centred on (embed() uses it from now on).
  void set_centroids(const torch::Tensor& centroids, const torch::Tensor& sizes,
                     const torch::Tensor& mean = {});  // [G, C], [G], [C]
  // Each group needs K routable experts, the general experts K_general (set_expert_mask checks both).
  void set_expert_mask(const torch::Tensor& active) override;

  torch::Tensor group_weight;    // [G, Eg, C] each cluster's router
  torch::Tensor general_weight;  // [n_general, C] the cluster-independent router (when n_general > 0)
  torch::Tensor centroids;       // [G, C] buffer, unit rows once initialised
  torch::Tensor centroid_count;  // [G] buffer (float64): sequences absorbed per centroid (0 = uninitialised)
  torch::Tensor expert_count;    // [E] buffer (float64): assignments kept since construction
  torch::Tensor pooled_mean;     // [C] buffer: running mean of the pooled vectors (embed() centres on it)
  torch::Tensor pooled_mean_count;  // [1] buffer (float64): sequences it has seen (0 = not yet known)

 private:
  // Seeds uninitialised centroids from the batch (farthest-point: the sequence least similar to every
  // initialised centroid), so that online clustering starts from the data instead of random directions.
  void seed_centroids(const torch::Tensor& unit_pooled);

  MoEConfig cfg_;
  int64_t n_expert_, n_cluster_, n_per_group_, n_general_, k_, k_general_;
  torch::Tensor pending_sum_;       // [G, C] sum of unit pooled vectors routed since the last after_step
  torch::Tensor pending_n_;         // [G] their count
  torch::Tensor pending_pool_sum_;  // [C] sum of raw pooled vectors since the last after_step
};
TORCH_MODULE(MoCERouter);

}  // namespace moeforge
