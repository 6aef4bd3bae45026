// The expert-choice router's own [moe] keys (docs/routing.md section 2), bound and checked by its registry
// row (src/routing/expert_choice.cpp). A section header: it includes nothing of moeforge
// (docs/architecture.md, "Config sections").
#pragma once

#include <string>

namespace moeforge {

enum class ECMode { kCausal, kNonCausal, kThreshold };
enum class ECEval { kBatch, kThreshold };

struct ExpertChoiceOptions {
  // moe.ec_capacity_factor: expert e takes k_e = round(T * CF / E) tokens (Zhou et al. 2022: CF = 2 has the
  // compute of top-2).
  double capacity_factor = 2.0;
  // moe.ec_mode: how EC routes in training: "causal" (choice among the tokens at the same position across
  // the batch, the LM default), "noncausal" (choice over the whole batch: leaks the future, encoders and
  // analysis only), "threshold" (per-token routing with the calibrated thresholds, training and evaluation
  // alike).
  ECMode mode = ECMode::kCausal;
  // moe.ec_eval: routing in evaluation for ec_mode causal/noncausal: "threshold" (what generation can use)
  // or "batch" (the training grouping; evaluation reports both).
  ECEval eval = ECEval::kThreshold;
  double threshold_decay = 0.99;  // moe.ec_threshold_decay: EMA decay of the thresholds
};

std::string to_string(ECMode v);
std::string to_string(ECEval v);

}  // namespace moeforge
