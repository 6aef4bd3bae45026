// Uses an installed moeforge as a library: trains a SentencePiece tokenizer (which needs the runtime module
// found relative to the installed library), round-trips a sentence, and runs a top-2 MoE layer forward and
// backward. Prints what it checked; exits non-zero on any mismatch (tests/install/run.sh).
#include <torch/torch.h>

#include <iostream>

#include "moeforge/data/tokenizer.h"
#include "moeforge/data/tokenizer_module.h"
#include "moeforge/layer/moe_layer.h"

int main() {
  using namespace moeforge;
  std::vector<std::string> texts;
  for (int i = 0; i < 50; ++i)
    texts.push_back("the experts route tokens to the experts that know them best, sentence " +
                    std::to_string(i));
  const Tokenizer tok = Tokenizer::train(texts, 64, 7);
  const std::string s = "the experts route tokens";
  const auto ids = tok.encode(s);
  if (tok.decode(ids) != s) {
    std::cerr << "consumer: tokenizer round trip gave '" << tok.decode(ids) << "'\n";
    return 1;
  }
  std::cout << "tokenizer module: " << tokenizer_module_path() << "\n";
  std::cout << "tokens: " << ids.size() << " of a vocabulary of " << tok.vocab_size() << "\n";

  torch::manual_seed(0);
  MoEConfig cfg;
  cfg.n_expert = 4;
  cfg.n_expert_used = 2;
  cfg.d_expert = 16;
  MoELayer layer(cfg, 8);
  auto x = torch::randn({6, 8}, torch::requires_grad());
  auto out = layer->forward(x);
  out.y.sum().backward();
  if (out.y.sizes() != x.sizes() || !x.grad().defined() || !torch::isfinite(x.grad()).all().item<bool>()) {
    std::cerr << "consumer: MoE layer forward/backward failed\n";
    return 1;
  }
  std::cout << "moe layer: forward " << out.y.sizes() << ", backward ok\n";
  return 0;
}
