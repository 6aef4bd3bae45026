// moeforge train: a run of the embedded default or a config file, resumable, on one process or as one rank
// of a c10d group; then the run's report (docs/training.md).
#include <csignal>
#include <filesystem>
#include <iostream>

#include "cli_util.h"
#include "command.h"
#include "moeforge/data/prepare.h"
#include "moeforge/dist/dist.h"
#include "moeforge/experiments/report.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"
#include "moeforge/util/interrupt.h"
#include "moeforge/util/runtime.h"

namespace fs = std::filesystem;

namespace moeforge::cli {

namespace {

struct TrainArgs {
  std::string config_path, out_dir = "runs/default", resume, init_from;
  std::vector<std::string> overrides;
  int64_t stop_after = 0;
  bool no_report = false, overwrite = false, out_given = false;
};

// --resume without --out continues in the run folder the checkpoint belongs to (<run>/checkpoints/step-N),
// not in the default folder.
void resume_into_its_run(TrainArgs& a) {
  if (a.resume.empty() || a.out_given) return;
  const fs::path ckpt = resolve_checkpoint_dir(a.resume);
  if (ckpt.parent_path().filename() != "checkpoints") return;
  a.out_dir = ckpt.parent_path().parent_path().string();
  std::cout << "resuming into " << a.out_dir << " (the run of " << ckpt.string()
            << "; --out says otherwise)\n";
}

// The run config: the checkpoint's for --resume (train_model reads it), the --init checkpoint's without
// --config, else --config or the embedded default; --set on top. Validated once, here.
RunConfig run_config_of(const TrainArgs& a, const Globals& g) {
  RunConfig cfg;
  if (!a.resume.empty()) {
    // The checkpoint's config is the run's; --set may change only how long and how often (train_model
    // checks the keys).
    if (!a.config_path.empty())
      throw ConfigError("--config",
                        "cannot be combined with --resume: the run continues the checkpoint's configuration "
                        "(change train.steps or the cadences with --set)");
  } else if (!a.init_from.empty() && a.config_path.empty()) {
    const auto ckpt = load_checkpoint(a.init_from);
    cfg = load_run_config_text(ckpt.config_toml, a.init_from + "/config.toml", a.overrides);
  } else {
    cfg = load_run_config(a.config_path, a.overrides);
  }
  if (g.threads > 0) cfg.train.threads = g.threads;
  return cfg;
}

// report.md with its plots and a sample, from the run's last checkpoint.
void write_run_report(const TrainArgs& a, const TrainSummary& summary) {
  auto lm = load_model(summary.checkpoint);
  const std::string tok = lm.tokenizer->serialized();
  DataBundle data = prepare_data(lm.cfg.data, &tok, std::cout);
  const double unigram = unigram_perplexity(data.train, data.validation, lm.tokenizer->vocab_size());
  GenerateOptions gen;
  gen.max_tokens = 48;
  gen.seed = 7;
  const std::string sample = sample_text(lm, "The jury said", gen);
  std::cout << "sample: " << sample << "\n";
  auto counts = count_model(*lm.model);
  ReportInputs rin;
  rin.run_dir = a.out_dir;
  rin.title = "moeforge run: " + lm.cfg.moe.router + " router, " +
              std::to_string(lm.cfg.moe.routed_experts()) + " experts, top-" +
              std::to_string(lm.cfg.moe.routed_used());
  rin.facts = {
      {"steps", std::to_string(summary.step)},
      {"parameters (total / active per token)",
       std::to_string(counts.total_params) + " / " + std::to_string(counts.active_params)},
      {"training throughput", fixed(summary.tokens_per_s, 0) + " tokens/s (" + describe_machine() + ")"},
      {"unigram baseline perplexity (validation)", fixed(unigram, 2)}};
  if (summary.validation) {
    rin.facts.push_back({"validation perplexity", fixed(summary.validation->perplexity, 2)});
    rin.facts.push_back(
        {"MaxVio_global (validation, mean over layers)", fixed(summary.validation->max_vio_global, 3)});
    rin.facts.push_back(
        {"specialisation I(genre; expert)/H(genre)", fixed(summary.validation->specialization, 3)});
    rin.validation = &*summary.validation;
  }
  if (summary.heldout)
    rin.facts.push_back({"held-out genre perplexity", fixed(summary.heldout->perplexity, 2)});
  rin.sample = sample;
  std::cout << "unigram baseline perplexity " << fixed(unigram, 2) << "; report: " << write_report(rin)
            << "\n";
}

int run_train(TrainArgs& a, const Globals& g) {
  RunConfig cfg = run_config_of(a, g);
  resume_into_its_run(a);
  TrainOptions opt;
  opt.out_dir = a.out_dir;
  opt.overwrite = a.overwrite;
  opt.resume = a.resume;
  if (!a.resume.empty()) opt.resume_overrides = a.overrides;
  opt.stop_after = a.stop_after;
  opt.init_from = a.init_from;
  // SIGINT / SIGTERM: finish the step, checkpoint it, exit 128 + signal (docs/reliability.md).
  install_stop_handlers();
  opt.stop_on_signal = true;
  // Past one process (docs/distributed.md): mpirun's or torchrun-style variables make this process one rank
  // of a group; without them it trains alone.
  dist::init(dist::launch_env_from_environment());
  if (dist::rank() != 0) a.no_report = true;  // rank 0 writes the run folder
  auto summary = train_model(cfg, opt, std::cout);
  dist::shutdown();
  if (summary.interrupted_by) {
    std::cerr << "moeforge: interrupted by " << (summary.interrupted_by == SIGINT ? "SIGINT" : "SIGTERM")
              << " after step " << summary.step << "; checkpoint " << summary.checkpoint
              << "\nmoeforge: resume with: " << g.argv0 << " train --resume "
              << (fs::path(a.out_dir) / "checkpoints").string() << " --out " << a.out_dir << "\n";
    return 128 + summary.interrupted_by;
  }
  if (summary.step < summary.planned_steps)
    std::cout << "stopped after step " << summary.step << " (--stop-after " << a.stop_after
              << "); resume with: " << g.argv0 << " train --resume "
              << (fs::path(a.out_dir) / "checkpoints").string() << "\n";
  if (!a.no_report) write_run_report(a, summary);
  return 0;
}

}  // namespace

Command add_train(CLI::App& app, const Globals& g) {
  auto a = std::make_shared<TrainArgs>();
  auto* c = app.add_subcommand("train", "train a MoE language model (default: configs/default.toml)");
  c->add_option("--config", a->config_path, "TOML config file (default: the embedded configs/default.toml)")
      ->check(CLI::ExistingFile);
  c->add_option("--set", a->overrides, "override a config key: section.key=value (repeatable)");
  c->add_option("--out", a->out_dir, "run folder: metrics.jsonl, checkpoints/, report.md");
  c->add_option("--resume", a->resume, "continue from a checkpoint folder (or a run's checkpoints/ folder)");
  c->add_option("--stop-after", a->stop_after, "stop with a checkpoint after this many steps in total")
      ->check(CLI::NonNegativeNumber);
  c->add_flag("--no-report", a->no_report, "skip report.md and the sample");
  c->add_flag("--overwrite", a->overwrite,
              "replace the earlier run a fresh run finds in --out (else that is an error)");
  c->add_option("--init", a->init_from,
                "start from this checkpoint's weights, tokenizer and config (+ --set), fresh optimiser");
  return {c, [a, c, &g] {
            a->out_given = c->count("--out") > 0;
            return run_train(*a, g);
          }};
}

}  // namespace moeforge::cli
