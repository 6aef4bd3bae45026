// moeforge generate: a checkpoint continues a prompt, with a KV cache (every router, docs/routing.md).
#include <iostream>

#include "cli_util.h"
#include "command.h"

namespace moeforge::cli {

namespace {

struct GenerateArgs {
  std::string checkpoint, prompt;
  GenerateOptions options;
  bool ignore_eos = false, timing = false;
};

}  // namespace

Command add_generate(CLI::App& app, const Globals& /*g*/) {
  auto a = std::make_shared<GenerateArgs>();
  auto* c = app.add_subcommand("generate", "generate text from a checkpoint (KV cache)");
  c->add_option("--checkpoint", a->checkpoint, "checkpoint folder")->required();
  c->add_option("--prompt", a->prompt, "the text to continue")->required();
  c->add_option("--max-tokens", a->options.max_tokens, "new tokens at most")->check(CLI::PositiveNumber);
  c->add_option("--temperature", a->options.temperature, "sampling temperature (0 = greedy)")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--top-p", a->options.top_p, "nucleus sampling mass")->check(CLI::Range(0.0, 1.0));
  c->add_option("--seed", a->options.seed, "sampling seed");
  c->add_flag("--ignore-eos", a->ignore_eos, "generate --max-tokens tokens even past </s>");
  c->add_flag("--timing", a->timing, "print prefill and decode speed to stderr (docs/interop.md)");
  return {c, [a] {
            auto lm = load_model(a->checkpoint);
            std::cout << sample_text(lm, a->prompt, a->options, a->ignore_eos, a->timing) << "\n";
            return 0;
          }};
}

}  // namespace moeforge::cli
