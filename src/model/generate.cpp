#include "moeforge/model/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <stdexcept>
#include <string>

namespace moeforge {

void check_generate_options(const GenerateOptions& opt) {
  if (!std::isfinite(opt.temperature) || opt.temperature < 0)
    throw std::invalid_argument("temperature must be a finite number >= 0 (0 = greedy), got " +
                                std::to_string(opt.temperature));
  if (!(opt.top_p > 0 && opt.top_p <= 1))  // NaN fails too
    throw std::invalid_argument("top_p must be in (0, 1], got " + std::to_string(opt.top_p));
  if (opt.max_tokens < 1)
    throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(opt.max_tokens));
}

std::vector<int64_t> generate(TransformerLM& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& opt, GenerateStop* why, const GenerateHooks& hooks) {
  check_generate_options(opt);
  if (prompt.empty()) throw std::invalid_argument("the prompt must have at least one token");
  const int64_t max_len = model->model_config().max_seq_len;
  if (int64_t(prompt.size()) >= max_len)
    throw std::invalid_argument("the prompt has " + std::to_string(prompt.size()) +
                                " tokens (with <s>), the model's context is " + std::to_string(max_len) +
                                ": shorten the prompt to at most " + std::to_string(max_len - 1) + " tokens");
  torch::NoGradGuard ng;
  const bool was_training = model->is_training();
  model->eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
  KVCache cache;
  RouteContext ctx;
  ctx.generating = true;
  // The prompt is the prompt: a router that pools prompts never lets a generated token
  // join it; the others ignore it.
  ctx.prompt_len = torch::tensor({int64_t(prompt.size())}, torch::kLong);
  auto input = torch::tensor(prompt, torch::kLong).unsqueeze(0);  // [1, P]
  std::vector<int64_t> out;
  GenerateStop stop = GenerateStop::kMaxTokens;
  while (int64_t(out.size()) < opt.max_tokens && cache.length() + input.size(1) <= max_len) {
    // Each router's state for the next token travels in the cache (KVCache::route).
    const int64_t start = cache.length();
    auto res = model->forward(input, ctx, &cache);
    if (hooks.on_step) hooks.on_step(input, start, res);
    auto logits = res.logits.select(1, res.logits.size(1) - 1).squeeze(0).to(torch::kDouble);  // [V]
    int64_t next;
    if (opt.temperature <= 0) {
      next = logits.argmax().item<int64_t>();
    } else {
      auto probs = torch::softmax(logits / opt.temperature, 0);
      auto sorted = probs.sort(0, /*descending=*/true);
      auto p_sorted = std::get<0>(sorted), idx = std::get<1>(sorted);
      // Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
      auto cum = p_sorted.cumsum(0);
      auto drop = (cum - p_sorted) >= opt.top_p;
      p_sorted = p_sorted.masked_fill(drop, 0.0);
      auto pick = torch::multinomial(p_sorted / p_sorted.sum(), 1, false, gen);
      next = idx[pick.item<int64_t>()].item<int64_t>();
    }
    out.push_back(next);
    const bool go_on = !hooks.on_token || hooks.on_token(next);
    if (next == opt.eos_id) {
      stop = GenerateStop::kEos;
      break;
    }
    if (!go_on) {
      stop = GenerateStop::kHook;
      break;
    }
    if (int64_t(out.size()) < opt.max_tokens && cache.length() + 1 > max_len) {
      stop = GenerateStop::kContext;
      break;
    }
    input = torch::tensor({next}, torch::kLong).unsqueeze(0);
  }
  if (was_training) model->train();
  if (why) *why = stop;
  return out;
}

}  // namespace moeforge
