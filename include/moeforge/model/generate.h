// Sampling text from a TransformerLM with a KV cache: temperature and nucleus (top-p) sampling, seeded.
#pragma once

#include <functional>
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

// Why a generation ended: max_tokens, the end-of-sequence token, the model's context (max_seq_len), or a
// hook that asked it to stop (GenerateHooks::on_token).
enum class GenerateStop { kMaxTokens, kEos, kContext, kHook };

// What a caller may watch of a generation, without a loop of its own.
struct GenerateHooks {
  // After each forward: its input tokens [1, n], the position of the first of them (the prompt's forward
  // starts at 0, each new token's at its own position) and the forward's output, whose plans are the
  // routing those positions got (a routing trace, model/trace.h).
  std::function<void(const torch::Tensor& input, int64_t start, const LMOutput& out)> on_step;
  // After each new token is picked (</s> included; before the token's forward): false ends the generation
  // there, with the token kept (GenerateStop::kHook, unless the token was </s>): a server's stop sequence,
  // its time limit or a client gone.
  std::function<bool(int64_t token)> on_token;
};

// Throws std::invalid_argument naming the option when `opt` is out of range: temperature finite and >= 0,
// top_p in (0, 1], max_tokens >= 1 (docs/reliability.md, "Shared folders and limits").
void check_generate_options(const GenerateOptions& opt);

// Returns the new tokens (not the prompt). The prompt is routed once, then each new token alone; what a
// router carries from one token to the next (a running pool, a sequence's cluster) travels in the KV cache
// (KVCache::route), so a token is routed as a full forward would route it.
// `opt` is checked (check_generate_options); a prompt that leaves no room in the model's context is a
// std::invalid_argument saying so. `why`, when given, says why it ended: max_tokens, the end-of-sequence
// token, or the model's context (max_seq_len) reached first. `hooks` see every step and may end it.
std::vector<int64_t> generate(TransformerLM& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& opt, GenerateStop* why = nullptr,
                              const GenerateHooks& hooks = {});

}  // namespace moeforge
