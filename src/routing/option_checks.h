// Checks the registry rows share (each router's row is in its own .cpp; registry.h). Private to routing/.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "moeforge/routing/moe_config.h"
#include "moeforge/util/error.h"

namespace moeforge::option_checks {

inline std::string str(int64_t v) {
  return std::to_string(v);
}

inline void unit_decay(const char* key, double v) {
  if (!(v >= 0 && v < 1)) throw ConfigError(key, "must be in [0, 1), got " + std::to_string(v));
}

inline void nonneg(const char* key, double v) {
  if (!std::isfinite(v) || v < 0)
    throw ConfigError(key, "must be a finite number >= 0, got " + std::to_string(v));
}

// The G-cluster key shared by the two-stage routers (moe.n_cluster is bound with the common keys).
inline void clusters(const MoEConfig& c) {
  if (c.n_cluster < 1) throw ConfigError("moe.n_cluster", "must be >= 1, got " + str(c.n_cluster));
}

// Token-choice routers keep K per token as it is (RouterSpec::equal_compute).
inline std::string same_k(MoEConfig& m) {
  return "top-" + str(m.n_expert_used);
}

}  // namespace moeforge::option_checks
