// Sparse upcycling (Komatsuzaki et al. 2023): an MoE checkpoint built from a trained dense one. Every FFN of
// a layer that becomes MoE is copied into each of its experts (with optional noise so that experts can
// diverge), the router starts fresh, and everything else (embedding, attention, norms, remaining dense
// FFNs) is copied unchanged.
#pragma once

#include <string>
#include <vector>

namespace moeforge {

struct UpcycleOptions {
  std::string dense_checkpoint;        // a checkpoint whose model has dense FFNs where MoE layers will be
  std::vector<std::string> overrides;  // --set section.key=value on top of the dense run's config
  std::string out_dir;                 // the new checkpoint folder
  double noise = 0.0;                  // relative std of Gaussian noise added to each expert copy
  uint64_t seed = 0;
};

// Returns a description of what was copied. Throws ConfigError when the new config cannot be upcycled
// from the dense one (a non-MoE config, an expert width that differs from the dense FFN).
std::string upcycle(const UpcycleOptions& opt);

}  // namespace moeforge
