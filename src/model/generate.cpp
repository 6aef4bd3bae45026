#include "moeforge/model/generate.h"

#include <ATen/CPUGeneratorImpl.h>

namespace moeforge {

std::vector<int64_t> generate(TransformerLM& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& opt) {
  TORCH_CHECK(!prompt.empty(), "generate: the prompt must have at least one token");
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
  const int64_t max_len = model->model_config().max_seq_len;
  TORCH_CHECK(int64_t(prompt.size()) < max_len, "generate: the prompt has ", prompt.size(),
              " tokens; the model's context is ", max_len);
  std::vector<int64_t> out;
  while (int64_t(out.size()) < opt.max_tokens && cache.length() + input.size(1) <= max_len) {
    // Each router's state for the next token travels in the cache (KVCache::route).
    auto res = model->forward(input, ctx, &cache);
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
    if (next == opt.eos_id) break;
    input = torch::tensor({next}, torch::kLong).unsqueeze(0);
  }
  if (was_training) model->train();
  return out;
}

}  // namespace moeforge
