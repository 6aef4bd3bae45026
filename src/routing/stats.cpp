#include "moeforge/routing/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "moeforge/dist/dist.h"

namespace moeforge {

double max_violation(const std::vector<double>& load) {
  if (load.empty()) return 0;
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  if (total <= 0) return 0;
  const double mean = total / load.size();
  return (*std::max_element(load.begin(), load.end()) - mean) / mean;
}

RoutingStats make_routing_stats(std::vector<int64_t> load, int64_t n_tokens, int64_t n_requested,
                                int64_t n_balanced) {
  RoutingStats s;
  s.load = std::move(load);
  s.n_tokens = n_tokens;
  s.n_requested = n_requested;
  s.n_kept = std::accumulate(s.load.begin(), s.load.end(), int64_t{0});
  s.dropped_share = n_requested > 0 ? double(n_requested - s.n_kept) / double(n_requested) : 0.0;
  s.n_balanced = n_balanced > 0 && n_balanced < int64_t(s.load.size()) ? n_balanced : 0;
  const size_t E = s.n_balanced > 0 ? size_t(s.n_balanced) : s.load.size();
  if (E == 0) return s;
  std::vector<double> l(s.load.begin(), s.load.begin() + int64_t(E));
  s.max_vio = max_violation(l);
  const double kept = std::accumulate(l.begin(), l.end(), 0.0);
  const double mean = kept / double(E);
  double var = 0, ent = 0;
  for (double x : l) {
    var += (x - mean) * (x - mean);
    if (x > 0 && kept > 0) {
      const double p = x / kept;
      ent -= p * std::log(p);
    }
    if (x == 0) ++s.dead_experts;
  }
  s.load_cv = mean > 0 ? std::sqrt(var / double(E)) / mean : 0.0;
  s.load_entropy = E > 1 ? ent / std::log(double(E)) : 1.0;
  return s;
}

RoutingStats global_routing_stats(const RoutingStats& stats) {
  if (!dist::active()) return stats;
  std::vector<int64_t> ints = {stats.n_tokens, stats.n_requested};
  ints.insert(ints.end(), stats.load.begin(), stats.load.end());
  ints.insert(ints.end(), stats.group_load.begin(), stats.group_load.end());
  std::vector<torch::Tensor> t = {torch::tensor(ints, torch::kLong)};
  dist::allreduce_sum(t, "the routing stats");
  auto c = t[0].contiguous();
  const std::vector<int64_t> g(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  const size_t E = stats.load.size();
  std::vector<int64_t> load(g.begin() + 2, g.begin() + 2 + long(E));
  auto out = make_routing_stats(load, g[0], g[1], stats.n_balanced);
  out.group_load.assign(g.begin() + 2 + long(E), g.end());
  return out;
}

}  // namespace moeforge
