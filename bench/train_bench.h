// End-to-end training speed (../shared/docs/BENCHMARKS.md "End to end"): training steps of a model config
// with the fused MoE path against the same model on the plain LibTorch experts (experts_impl =
// "reference", the path every MoE layer took before the fast layer), and a large sgemm, interleaved in one
// run. Reports tokens/s and achieved FLOP/s as a share of the sgemm FLOP/s measured in the same run.
#pragma once

#include <nlohmann/json.hpp>

#include <ostream>
#include <string>
#include <vector>

namespace moeforge {

struct TrainBenchOptions {
  std::string config;                  // TOML file; empty = the embedded configs/default.toml
  std::vector<std::string> overrides;  // "section.key=value"
  int steps = 8;                       // timed training steps per variant (after two warm-up steps)
};

// Returns {"machine", "config", "tokens_per_step", "train_flops_per_token", "sgemm_gflops",
// "variants": {"fused": {...}, "plain": {...}}, "speedup"}; prints a table to `log`.
nlohmann::json run_train_bench(const TrainBenchOptions& opt, std::ostream& log);

}  // namespace moeforge
