// The [dist] section (dist_config.h).
#include "moeforge/dist/dist_config.h"

#include <string>

#include "moeforge/config/binder.h"
#include "moeforge/util/error.h"

namespace moeforge {

void DistConfig::validate() const {
  if (expert_parallel < 1)
    throw ConfigError("dist.expert_parallel", "must be >= 1, got " + std::to_string(expert_parallel));
}

void bind_dist_config(ConfigBinder& b, DistConfig* c) {
  b.bind("dist.expert_parallel", &c->expert_parallel);  // docs/distributed.md
}

}  // namespace moeforge
