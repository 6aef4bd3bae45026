// Sampling text from a TransformerLM with a KV cache: temperature and nucleus (top-p) sampling, seeded.
#pragma once

#include <vector>

#include "moeforge/model/transformer.h"

namespace moeforge {

struct GenerateOptions {
  int64_t max_tokens = 64;   // new tokens at most (also bounded by the model's max_seq_len)
  double temperature = 0.8;  // 0 = greedy
  double top_p = 0.95;       // nucleus: sample from the smallest set of tokens with this much probability
  uint64_t seed = 0;
  int64_t eos_id = -1;  // stop at this token (-1: never)
};

// Returns the new tokens (not the prompt). The prompt is routed once; routers that assign a sequence to a
// cluster (MoCE: nearest centroid) keep that cluster for every generated token.
std::vector<int64_t> generate(TransformerLM& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& opt);

}  // namespace moeforge
