// The loss-free router's own [moe] keys (docs/routing.md section 3), bound and checked by its registry row
// (src/routing/loss_free.cpp). A section header (docs/architecture.md, "Config sections").
#pragma once

namespace moeforge {

struct LossFreeOptions {
  double bias_update_rate = 1e-3;  // moe.bias_update_rate: the bias step u (Wang et al. 2024)
};

}  // namespace moeforge
