// The [dist] section: how a run spreads over the ranks of a process group (docs/distributed.md). Which
// ranks there are comes from the launcher's environment, not from here (dist.h). A section header
// (docs/architecture.md, "Config sections": it includes nothing of moeforge).
#pragma once

#include <cstdint>

namespace moeforge {

struct DistConfig {
  // dist.expert_parallel: how many ranks share the routed experts of every MoE layer, each holding
  // 1/expert_parallel of them; it divides the world size. In one process (eval, generate, a resume on one
  // rank) every expert is local whatever it says.
  int64_t expert_parallel = 1;
  // Its own range; RunConfig::validate checks it against the experts.
  void validate() const;
};

class ConfigBinder;
// Registers every [dist] key of `cfg` under "dist.<key>".
void bind_dist_config(ConfigBinder& binder, DistConfig* cfg);

}  // namespace moeforge
