// End-to-end training speed (method: docs/performance.md, "Definitions"): training steps of a model config
// with the fused MoE path against the same model on the plain LibTorch experts (experts_impl =
// "reference", the path every MoE layer took before the fast layer), and a large sgemm, interleaved in one
// run. Reports tokens/s and achieved FLOP/s as a share of the sgemm FLOP/s measured in the same run.
#pragma once

#include <nlohmann/json.hpp>

#include <ostream>
#include <string>
#include <vector>

#include "moeforge/experiments/compare.h"

namespace moeforge {

struct TrainBenchOptions {
  std::string config;                  // TOML file; empty = the embedded configs/default.toml
  std::vector<std::string> overrides;  // "section.key=value"
  int steps = 8;                       // timed training steps per variant (after two warm-up steps)
};

// Returns {"machine", "config", "tokens_per_step", "train_flops_per_token", "sgemm_gflops",
// "bf16_gemm_gflops", "cpu_bf16", "variants": {"fused": {...}, "plain": {...}, "bf16": {...}}, "speedup",
// "bf16_speedup"}; prints a table to `log`. fused and plain train in float32 (their shares are of the sgemm
// rate); bf16 is fused with train.precision = "bf16", run only where the CPU has native bf16 (its share is
// of the bf16 GEMM rate).
nlohmann::json run_train_bench(const TrainBenchOptions& opt, std::ostream& log);

// Where a training step of the fused model goes (docs/performance.md, "Where a training step goes"):
// opt.steps steps after two warm-up steps, each timed as data, forward, backward and optimiser. Forward
// time by category comes from the model's profiling scopes (RECORD_USER_SCOPE "moeforge::..."), backward
// time from the autograd nodes, each given the category of the forward scope that created it (by its
// sequence number). Categories: embedding, attention, norm, dense_ffn, routing, experts,
// output_projection, cross_entropy; "other" is the rest of forward or backward (residual adds, aux loss,
// gradient accumulation, the autograd engine between nodes). Also times as many unprofiled steps, for the
// profiler's own cost. Returns per-category ms per step; prints a table to `log`.
nlohmann::json run_train_profile(const TrainBenchOptions& opt, std::ostream& log);

// Training throughput of a comparison's variants (moeforge compare, docs/comparison.md): one model per
// variant (its resolved config, first seed), all trained on the same batches, their steps interleaved in
// one process (A B C ..., rotated each round), `steps` timed steps each after two warm-up steps. Returns
// {"machine", "steps", "tokens_per_step", "variants": {name: {"step_ms", "step_ms_range", "tokens_per_s",
// "ratio_to_first"}}}; prints a table to `log`.
nlohmann::json run_variant_throughput(const std::vector<CompareVariant>& variants, int steps,
                                      std::ostream& log);

}  // namespace moeforge
