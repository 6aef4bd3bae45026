// Routing measures of docs/routing.md section 9, computed from per-expert counts (cheap: O(E)).
#pragma once

#include <cstdint>
#include <vector>

namespace moeforge {

struct RoutingStats {
  std::vector<int64_t> load;  // [E] assignments kept per expert
  int64_t n_tokens = 0;       // T
  int64_t n_requested = 0;    // assignments the router asked for, before capacity
  int64_t n_kept = 0;         // N: assignments kept
  double max_vio = 0;         // (max_e load_e - mean load) / mean load
  double dropped_share = 0;   // (requested - kept) / requested
  double load_cv = 0;         // std(load) / mean(load)
  double load_entropy = 0;    // H(load / sum) / log(E), in [0,1]
  int64_t dead_experts = 0;   // experts with load 0
  // The measures above are over the first n_balanced experts (all when 0): MoCE's general experts serve
  // every token and are not balanced against the group experts.
  int64_t n_balanced = 0;
  std::vector<int64_t> group_load;  // [G] (token, group) pairs kept, for two-stage routers (else empty)
};

// Fills every derived measure from `load`, `n_tokens` and `n_requested`.
RoutingStats make_routing_stats(std::vector<int64_t> load, int64_t n_tokens, int64_t n_requested,
                                int64_t n_balanced = 0);

// MaxVio of any load vector (0 for an empty or all-zero load).
double max_violation(const std::vector<double>& load);

// Data parallelism (docs/distributed.md): the routing stats of the global batch from each rank's `stats`
// (loads and counts summed over ranks). `stats` itself in one process.
RoutingStats global_routing_stats(const RoutingStats& stats);

}  // namespace moeforge
