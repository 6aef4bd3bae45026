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

// Why a generation ended.
enum class GenerateStop { kMaxTokens, kEos, kContext };

// Throws std::invalid_argument naming the option when `opt` is out of range: temperature finite and >= 0,
// top_p in (0, 1], max_tokens >= 1 (docs/reliability.md, "Shared folders and limits").
void check_generate_options(const GenerateOptions& opt);

// Returns the new tokens (not the prompt). The prompt is routed once, then each new token alone; what a
// router carries from one token to the next (a running pool, a sequence's cluster) travels in the KV cache
// (KVCache::route), so a token is routed as a full forward would route it.
// `opt` is checked (check_generate_options); a prompt that leaves no room in the model's context is a
// std::invalid_argument saying so. `why`, when given, says why it ended: max_tokens, the end-of-sequence
// token, or the model's context (max_seq_len) reached first.
std::vector<int64_t> generate(TransformerLM& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& opt, GenerateStop* why = nullptr);

}  // namespace moeforge
