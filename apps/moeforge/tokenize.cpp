// moeforge tokenize: a corpus of any size into a shard folder that data.corpus = "shards:DIR" trains on
// (docs/data.md, "Your own corpus").
#include <iostream>

#include <nlohmann/json.hpp>

#include "command.h"
#include "moeforge/config/run_config.h"
#include "moeforge/data/tokenize.h"

namespace moeforge::cli {

namespace {

struct TokenizeArgs {
  std::string corpus, out, tokenizer, config_path;
  std::vector<std::string> overrides;
  bool no_progress = false;
};

int run_tokenize(const TokenizeArgs& a) {
  // The [data] section of --config (or the embedded default) with --set on top: the split, the
  // tokenizer's size and seed, the JSON-lines keys and bad_lines.
  // tokenize_corpus checks the section's values with the corpus in them (Brown genres for "brown" only).
  auto overrides = a.overrides;
  overrides.push_back("data.corpus=" + nlohmann::json(a.corpus).dump());  // a TOML string, quotes escaped
  const RunConfig cfg = load_run_config(a.config_path, overrides);
  TokenizeOptions opt;
  opt.data = cfg.data;
  opt.out_dir = a.out;
  opt.tokenizer = a.tokenizer;
  opt.progress = !a.no_progress;
  const auto m = tokenize_corpus(opt, std::cout);
  std::cout << "wrote " << a.out << " (" << m["splits"].dump()
            << "); train on it with --set data.corpus=\"shards:" << a.out << "\"\n";
  return 0;
}

}  // namespace

Command add_tokenize(CLI::App& app, const Globals& /*g*/) {
  auto a = std::make_shared<TokenizeArgs>();
  auto* c = app.add_subcommand("tokenize", "tokenize a corpus into shards for data.corpus = \"shards:DIR\"");
  c->add_option("--corpus", a->corpus, "brown, text:DIR or jsonl:PATH (.jsonl, .jsonl.gz, .jsonl.zst)")
      ->required();
  c->add_option("--out", a->out, "the shard folder to write (must not exist)")->required();
  c->add_option(
      "--tokenizer", a->tokenizer,
      "use this SentencePiece model (a .model file, a checkpoint or a shard folder) instead of training one");
  c->add_option("--config", a->config_path,
                "TOML config whose [data] section applies (default: the embedded one)")
      ->check(CLI::ExistingFile);
  c->add_option(
      "--set", a->overrides,
      "override a [data] key: data.key=value (repeatable; e.g. data.vocab_size, data.bad_lines=\"skip\")");
  c->add_flag("--no-progress", a->no_progress, "no progress bars");
  return {c, [a] { return run_tokenize(*a); }};
}

}  // namespace moeforge::cli
