// The hierarchical (ClusterMoE) router's own [moe] keys (docs/routing.md section 5), bound and checked by
// its registry row (src/routing/hierarchical.cpp). moe.n_cluster (G) is a common key: MoCE has groups too.
// moe.n_expert_used is K_e, the experts taken inside each selected cluster, so a token has up to
// n_cluster_used * n_expert_used assignments. A section header (docs/architecture.md, "Config sections").
#pragma once

#include <cstdint>

namespace moeforge {

struct HierarchicalOptions {
  int64_t n_cluster_used = 1;            // moe.n_cluster_used: K_c clusters per token
  double cluster_capacity_factor = 0.0;  // moe.cluster_capacity_factor: cap_c = ceil(CF*T*K_c/G), 0 = none
  // moe.reliability: 1 tracks expert and cluster reliability, 0 switches it off (r stays 1): the baseline
  // of the fault experiment (docs/comparison.md). A number, as checkpoints have always written it.
  double reliability = 1.0;
  double reliability_decay = 0.9;     // moe.reliability_decay: EMA decay of expert/cluster reliability
  double reliability_explode = 10.0;  // moe.reliability_explode: output RMS > this x median = unhealthy
  // moe.reliability_recovery: per idle step, an expert (or cluster) with no health signal moves r toward
  // the prior 1 as r <- rec * r + (1 - rec); slower than the penalty, so a faulty expert is probed rarely.
  double reliability_recovery = 0.999;
  double diversity_coef = 1e-2;  // moe.diversity_coef: within-cluster router-row cosine penalty
  bool adaptive_weight = false;  // moe.adaptive_weight: scale the MoE output by sigmoid(w.x)
};

}  // namespace moeforge
