// The BIP router's own [moe] keys (docs/routing.md section 4), bound and checked by its registry row
// (src/routing/bip.cpp). A section header (docs/architecture.md, "Config sections").
#pragma once

#include <cstdint>
#include <string>

namespace moeforge {

enum class BipMode { kCausal, kSolve };

struct BipOptions {
  int64_t iters = 2;                // moe.bip_iters: dual iterations per step (Sun 2025)
  BipMode mode = BipMode::kCausal;  // moe.bip_mode: "causal" (route, then update) | "solve" (non-causal)
};

std::string to_string(BipMode v);

}  // namespace moeforge
