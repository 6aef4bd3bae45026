// moeforge generate: a checkpoint continues a prompt, with a KV cache (every router, docs/routing.md).
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli_util.h"
#include "command.h"
#include "moeforge/model/trace.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace moeforge::cli {

namespace {

struct GenerateArgs {
  std::string checkpoint, prompt, prompt_file, trace;
  std::string dtype = "fp32";
  GenerateOptions options;
  bool ignore_eos = false, timing = false;
};

// The prompt of --prompt or --prompt-file (a file of any length; the model's context bounds what is used).
std::string prompt_of(const GenerateArgs& a) {
  if (a.prompt_file.empty()) return a.prompt;
  std::ifstream in(a.prompt_file, std::ios::binary);
  if (!in) throw FileError(a.prompt_file, "cannot read the prompt file");
  std::ostringstream os;
  os << in.rdbuf();
  std::string p = os.str();
  while (!p.empty() && (p.back() == '\n' || p.back() == '\r')) p.pop_back();  // the file's last newline
  return p;
}

int run_generate(const GenerateArgs& a) {
  try {
    check_generate_options(a.options);
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    const std::string flag = what.rfind("temperature", 0) == 0 ? "--temperature"
                             : what.rfind("top_p", 0) == 0     ? "--top-p"
                                                               : "--max-tokens";
    throw ConfigError(flag, what.substr(what.find(' ') + 1));
  }
  auto lm = load_model(a.checkpoint);
  apply_dtype(lm, a.dtype);
  GenerateStop why = GenerateStop::kMaxTokens;
  // --trace: the routing of every position the generation routed (the prompt's forward, then each new
  // token's), from the plans of those very forwards (docs/serve.md, "Traces").
  GenerateHooks hooks;
  std::vector<nlohmann::json> records;
  std::optional<RoutingTracer> tracer;
  int64_t routed = 0, prompt_len = -1;
  std::vector<int64_t> picked;
  if (!a.trace.empty()) {
    tracer.emplace(*lm.model, &*lm.tokenizer);
    hooks.on_step = [&](const torch::Tensor& input, int64_t start, const LMOutput& out) {
      if (prompt_len < 0) prompt_len = input.size(1);
      for (auto& r : tracer->step(input, start, out, {}, prompt_len)) records.push_back(std::move(r));
      routed = start + input.size(1);
    };
    hooks.on_token = [&](int64_t t) {
      picked.push_back(t);
      return true;
    };
  }
  std::cout << sample_text(lm, prompt_of(a), a.options, a.ignore_eos, a.timing, &why, hooks) << "\n";
  if (tracer) {
    // The last token picked was never fed back: its record says so.
    if (!picked.empty()) records.push_back(tracer->unrouted(picked.back(), routed));
    auto header = trace_header(*lm.model, "generate");
    header["checkpoint"] = a.checkpoint;
    write_file_atomic(a.trace, [&](std::ostream& os) {
      os << header.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      for (const auto& r : records)
        os << r.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    });
    std::cerr << "moeforge: routing trace of " << records.size() << " tokens: " << a.trace << "\n";
  }
  if (why == GenerateStop::kContext)
    std::cerr << "moeforge: stopped at the model's context of " << lm.cfg.model.max_seq_len
              << " tokens (prompt included) before --max-tokens " << a.options.max_tokens << "\n";
  return 0;
}

}  // namespace

Command add_generate(CLI::App& app, const Globals& /*g*/) {
  auto a = std::make_shared<GenerateArgs>();
  auto* c = app.add_subcommand("generate", "generate text from a checkpoint (KV cache)");
  c->add_option("--checkpoint", a->checkpoint, "checkpoint folder")->required();
  add_dtype_option(c, a->dtype);
  auto* prompt = c->add_option("--prompt", a->prompt, "the text to continue");
  auto* file = c->add_option("--prompt-file", a->prompt_file, "read the text to continue from this file");
  prompt->excludes(file);
  c->add_option("--max-tokens", a->options.max_tokens, "new tokens at most (>= 1; the context also ends it)");
  c->add_option("--temperature", a->options.temperature, "sampling temperature (0 = greedy; finite, >= 0)");
  c->add_option("--top-p", a->options.top_p, "nucleus sampling mass, in (0, 1]");
  c->add_option("--seed", a->options.seed, "sampling seed");
  c->add_flag("--ignore-eos", a->ignore_eos, "generate --max-tokens tokens even past </s>");
  c->add_flag("--timing", a->timing, "print prefill and decode speed to stderr (docs/interop.md)");
  c->add_option("--trace", a->trace,
                "write the routing of every token to this JSON-lines file (docs/serve.md; see trace-view)");
  return {c, [a, prompt, file] {
            if (prompt->count() == 0 && file->count() == 0)
              throw ConfigError("--prompt",
                                "give the text to continue with --prompt TEXT or --prompt-file FILE");
            return run_generate(*a);
          }};
}

}  // namespace moeforge::cli
