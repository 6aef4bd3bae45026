// MoCE dual-stage routing (Eo et al., EMNLP 2025, arXiv 2509.10513; docs/routing.md, MoCE).
// Stage 1, per token: a cluster id c in {0..G-1}, the nearest centroid (cosine, plus a balancing bias) of the
// mean-pooled, stop-gradient input of the positions up to and including it (moe.moce_pool = "prefix", the
// causal default), of the prompt (moe.moce_pool = "prompt"), or of the whole sequence (moe.moce_pool =
// "sequence", NON-CAUSAL). The same rule runs in training, evaluation and generation. Stage 2, per token:
// top-K inside cluster c's group of Eg experts with cluster c's own router. Optional general experts (the
// last moce_n_general of the E experts) with a cluster-independent router are added to every token.
//
// Legend: B sequences of S positions, T = B*S tokens, C model width, E experts, G clusters,
// Eg = (E - n_general) / G experts per group, K experts per token inside the group.
#pragma once

#include "moeforge/routing/moe_config.h"
#include "moeforge/routing/registry.h"
#include "moeforge/routing/router.h"

namespace moeforge {

// What MoCE passes on (docs/routing.md, "Router state"). To the next MoE layer in the same forward: every
// token's cluster, which later layers keep (RoutingPlan::carry).
struct MoceCarry : RouterState {
  torch::Tensor token_cluster;  // [T] int64 on CPU
};
// To its own next step of a KV-cached generation (RoutingPlan::cache): what the positions already
// processed contribute to the pool (prefix and prompt pools), or, with the non-causal sequence pool, the
// cluster the prompt gave each sequence, kept for the whole generation. A test may also hand a router the
// clusters of whole sequences this way.
struct MoceCache : RouterState {
  torch::Tensor pool_sum;     // [B, C] sum of the pooled inputs of every position seen so far
  int64_t len = 0;            // positions seen so far
  torch::Tensor seq_cluster;  // [B] int64 on CPU, or undefined
};

class MoCERouterImpl : public Router {
 public:
  MoCERouterImpl(const MoEConfig& cfg, int64_t d_model);

  RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) override;
  // Online clustering and balance, from the step's sequences: centroids move toward the mean direction of
  // the sequences they took (an EMA with moe.centroid_decay), uninitialised ones are seeded from the data,
  // the centring mean follows, and the cluster bias takes a step of moe.moce_balance_rate.
  void after_step(const RouteFeedback& feedback) override;
  int64_t n_expert() const override { return n_expert_; }
  std::string name() const override {
    return cfg_.moce.pool == MocePool::kPrefix ? "moce" : "moce(sequence pool: non-causal)";
  }
  bool causal() const override { return cfg_.moce.pool == MocePool::kPrefix; }
  torch::Tensor assignment_scores(const torch::Tensor& x, const RoutingPlan& plan) override;
  nlohmann::json describe_state() const override;
  void reset_counters() override;

  // Nearest centroid (cosine plus cluster_bias) of each row of pooled [M, C]; only initialised centroids
  // compete (all ids 0 if none is initialised yet).
  torch::Tensor assign(const torch::Tensor& pooled) const;  // -> [M] int64 (CPU)
  // moe.moce_assign = "gate": the cluster of each row of pooled [M, C], argmax of seq_gate . pooled plus
  // cluster_bias (-> [M] int64 CPU), and the straight-through scale p_c / stop_gradient(p_c) of the
  // chosen cluster's softmax probability (-> [M], 1 in value, differentiable in seq_gate).
  std::pair<torch::Tensor, torch::Tensor> gate_assign(const torch::Tensor& pooled) const;
  // The clustering space: pooled [M, C] centred on the running mean of pooled vectors, rows of norm 1.
  torch::Tensor embed(const torch::Tensor& pooled) const;
  // Cosine of unit rows [M, C] to each centroid plus the cluster bias; -inf for uninitialised ones.
  torch::Tensor cluster_scores(const torch::Tensor& unit) const;  // -> [M, G]
  // The running prefix mean of x [B*S, C], after the `before` positions whose pooled inputs sum to
  // `before_sum` [B, C] (undefined: none; a KV-cached generation): row (b, t) is the mean of positions
  // 0..t of sequence b. With `prompt_len` [B] defined, only positions inside the prompt are pooled, and
  // from the prompt's end on every row is the prompt's mean.
  torch::Tensor prefix_pool(const torch::Tensor& x, int64_t B, int64_t S, const torch::Tensor& before_sum,
                            int64_t before, const torch::Tensor& prompt_len) const;
  // [B, S] 1 where a position (absolute: `before` + its index) is inside its sequence's prompt, else 0.
  torch::Tensor prompt_mask(int64_t B, int64_t S, int64_t before, const torch::Tensor& prompt_len,
                            const torch::TensorOptions& opt) const;
  // Global id of local expert j of group g.
  int64_t group_expert(int64_t g, int64_t j) const { return g * n_per_group_ + j; }
  int64_t n_per_group() const { return n_per_group_; }
  int64_t n_cluster() const { return n_cluster_; }

  // The cluster of every token of a plan this router made (MoceCarry).
  torch::Tensor token_clusters(const RoutingPlan& plan) const override;
  nlohmann::json trace_fields(const RoutingPlan& plan, int64_t token,
                              const std::vector<int64_t>& experts) const override;  // its cluster
  // Offline clustering (docs/routing.md section 6), when moe.moce_clustering is not "online": centroids
  // [G, C] from spherical k-means on this router's own representation (the mean-pooled input of each
  // sequence, or of its prompt with the prompt pool: the plan's first sequence row), and the sequences
  // behind each, so that an unseen sequence's nearest centroid is the cluster its training neighbours had.
  // Rows are normalised. `mean` [C], when defined, is the vector the clustering space was centred on
  // (embed() uses it from now on).
  std::optional<OfflineClustering> offline_clustering() const override;
  torch::Tensor sequence_representation(const RoutingPlan& plan) const override;
  void set_sequence_centroids(const torch::Tensor& centroids, const torch::Tensor& sizes,
                              const torch::Tensor& mean, const std::string& key) override;
  void set_centroids(const torch::Tensor& centroids, const torch::Tensor& sizes,
                     const torch::Tensor& mean = {});  // [G, C], [G], [C]
  // Each group needs K routable experts, the general experts K_general (set_expert_mask checks both).
  void set_expert_mask(const torch::Tensor& active) override;

  torch::Tensor group_weight;    // [G, Eg, C] each cluster's router
  torch::Tensor general_weight;  // [n_general, C] the cluster-independent router (when n_general > 0)
  torch::Tensor seq_gate;        // [G, C] the learned cluster gate (moe.moce_assign = "gate" only)
  torch::Tensor centroids;       // [G, C] buffer, unit rows once initialised
  torch::Tensor cluster_bias;    // [G] buffer: loss-free-style balance bias on the centroid scores
  torch::Tensor centroid_count;  // [G] buffer (float64): sequences absorbed per centroid (0 = uninitialised)
  torch::Tensor expert_count;    // [E] buffer (float64): assignments kept since construction
  torch::Tensor pooled_mean;     // [C] buffer: running mean of the pooled vectors (embed() centres on it)
  torch::Tensor pooled_mean_count;  // [1] buffer (float64): sequences it has seen (0 = not yet known)

 private:
  // Stage 1 of route() (docs/routing.md section 6): every token's cluster, [T] int64 on CPU; the chunk's
  // sequence pool [B, C] the centroids learn from; the learned gate's straight-through scale [T] (undefined
  // with the centroid rule); and what the next generation step starts from (null when the clusters were
  // carried from an earlier layer).
  struct MoceStage1 {
    torch::Tensor tok_cluster, seq_pool, gate_scale;
    std::shared_ptr<MoceCache> next;
  };
  MoceStage1 assign_clusters(const torch::Tensor& x, const RouteContext& ctx, int64_t B, int64_t S) const;

  // Seeds uninitialised centroids from the batch (farthest-point: the sequence least similar to every
  // initialised centroid), so that online clustering starts from the data instead of random directions.
  void seed_centroids(const torch::Tensor& unit_pooled);

  MoEConfig cfg_;
  int64_t n_expert_, n_cluster_, n_per_group_, n_general_, k_, k_general_;
};
TORCH_MODULE(MoCERouter);

// Its registry row: "moce", moe.moce_* and moe.centroid_decay (moce_options.h).
RouterSpec moce_router_spec();

}  // namespace moeforge
