// moeforge: the command line. Each subcommand has --help.
#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>

#include "../../bench/dist_bench.h"
#include "../../bench/layer_bench.h"
#include "../../bench/timing.h"
#include "../../bench/train_bench.h"
#include "moeforge/data/tokenizer_module.h"
#include "moeforge/dist/dist.h"
#include "moeforge/interop/export.h"
#include "moeforge/interop/hf.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/generate.h"
#include "moeforge/train/compare.h"
#include "moeforge/train/instruct_eval.h"
#include "moeforge/train/prune.h"
#include "moeforge/train/report.h"
#include "moeforge/train/trainer.h"
#include "moeforge/train/upcycle.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/interrupt.h"
#include "moeforge/util/runtime.h"

namespace fs = std::filesystem;
using namespace moeforge;

namespace {

std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(',', start);
    const std::string item = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

std::string fixed(double v, int p) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(p) << v;
  return os.str();
}

std::string sample_text(LoadedModel& lm, const std::string& prompt, const GenerateOptions& g,
                        bool ignore_eos = false, bool timing = false) {
  auto ids = lm.tokenizer->encode(prompt);
  ids.insert(ids.begin(), lm.tokenizer->bos_id());
  auto opt = g;
  opt.eos_id = ignore_eos ? -1 : lm.tokenizer->eos_id();
  if (timing) {
    // Decode speed inside one process (docs/interop.md, "Decode speed"): the same prompt with 1 new token
    // (prefill and the first token), then with all of them; the difference is the decode of the rest.
    auto one = opt;
    one.max_tokens = 1;
    const double t1 = bench::time_ms([&] { generate(lm.model, ids, one); });
    std::vector<int64_t> out;
    const double tn = bench::time_ms([&] { out = generate(lm.model, ids, opt); });
    const int64_t n = int64_t(out.size()) - 1;
    std::cerr << "timing: prompt " << ids.size() << " tokens, prefill + first token " << fixed(t1, 2)
              << " ms, decode of " << n << " more tokens " << fixed(tn - t1, 2)
              << " ms = " << fixed(n > 0 ? n / ((tn - t1) * 1e-3) : 0.0, 1) << " tokens/s\n";
  }
  auto out = generate(lm.model, ids, opt);
  if (!out.empty() && out.back() == opt.eos_id) out.pop_back();
  return prompt + lm.tokenizer->decode(out).insert(0, prompt.empty() || out.empty() ? "" : " ");
}

// MoCE: sequences by (nearest-centroid cluster, domain) and the purity, when the router has clusters.
void print_cluster_table(const EvalResult& r) {
  if (r.cluster_domain.empty()) return;
  std::cout << "clusters x domains (sequences; nearest-centroid assignment), purity "
            << fixed(r.cluster_purity, 3) << ":\n  cluster";
  for (auto& d : r.domains) std::cout << " " << std::setw(std::max<int>(6, int(d.size()))) << d;
  std::cout << "\n";
  for (size_t c = 0; c < r.cluster_domain.size(); ++c) {
    std::cout << "  " << std::setw(7) << c;
    for (size_t d = 0; d < r.domains.size(); ++d)
      std::cout << " " << std::setw(std::max<int>(6, int(r.domains[d].size()))) << r.cluster_domain[c][d];
    std::cout << "\n";
  }
}

// What a layer's router knows beyond the loads: its own description of its state (Router::describe_state:
// pruned experts, reliabilities and training utilisation, thresholds, bias, dual, centroid sizes), one key
// a line.
void print_router_state(const Router& router, size_t layer) {
  std::cout << "    router state (layer " << layer << "):\n";
  const nlohmann::json state = router.describe_state();  // kept alive: items() refers into it
  for (auto& [key, value] : state.items()) {
    std::string text = value.dump();
    if (text.size() > 2000) text = text.substr(0, 2000) + " ...";
    std::cout << "      " << key << ": " << text << "\n";
  }
}

void print_eval(const EvalResult& r) {
  std::cout << r.split << ": loss " << fixed(r.loss, 4) << ", perplexity " << fixed(r.perplexity, 2)
            << " over " << r.tokens << " tokens; MaxVio_global " << fixed(r.max_vio_global, 3)
            << ", specialisation " << fixed(r.specialization, 3) << "\n";
  for (size_t l = 0; l < r.layers.size(); ++l)
    std::cout << "  MoE layer " << l << ": MaxVio_global " << fixed(r.layers[l].max_vio_global, 3)
              << ", specialisation " << fixed(r.layers[l].specialization, 3) << "\n";
  if (r.has_ec)
    std::cout << "expert choice: batch-routed loss " << fixed(r.ec_batch_loss, 4) << " (ppl "
              << fixed(std::exp(r.ec_batch_loss), 2) << "), threshold-routed loss "
              << fixed(r.ec_threshold_loss, 4) << " (ppl " << fixed(std::exp(r.ec_threshold_loss), 2)
              << "), gap " << fixed(r.ec_gap(), 4) << " (generation can only use threshold routing)\n";
  print_cluster_table(r);
}

}  // namespace

int main(int argc, char** argv) {
  moeforge::ensure_thread_wait_policies(argv);
  CLI::App app{"moeforge: Mixture-of-Experts routing, training and measurement in C++"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "LibTorch threads (default: the cores available)")
      ->check(CLI::NonNegativeNumber);

  // train
  auto* train = app.add_subcommand("train", "train a MoE language model (default: configs/default.toml)");
  std::string config_path, out_dir = "runs/default", resume;
  std::vector<std::string> overrides;
  int64_t stop_after = 0;
  bool no_report = false;
  train->add_option("--config", config_path, "TOML config file (default: the embedded configs/default.toml)")
      ->check(CLI::ExistingFile);
  train->add_option("--set", overrides, "override a config key: section.key=value (repeatable)");
  train->add_option("--out", out_dir, "run folder: metrics.jsonl, checkpoints/, report.md");
  train->add_option("--resume", resume, "continue from a checkpoint folder (or a run's checkpoints/ folder)");
  train->add_option("--stop-after", stop_after, "stop with a checkpoint after this many steps in total")
      ->check(CLI::NonNegativeNumber);
  train->add_flag("--no-report", no_report, "skip report.md and the sample");
  std::string init_from;
  train->add_option("--init", init_from,
                    "start from this checkpoint's weights, tokenizer and config (+ --set), fresh optimiser");

  // upcycle
  auto* up = app.add_subcommand("upcycle", "build an MoE checkpoint from a dense one (sparse upcycling)");
  UpcycleOptions up_opt;
  up->add_option("--checkpoint", up_opt.dense_checkpoint, "the dense checkpoint")->required();
  up->add_option("--set", up_opt.overrides, "config overrides for the MoE model, e.g. model.moe_every=2");
  up->add_option("--out", up_opt.out_dir, "the new checkpoint folder")->required();
  up->add_option("--noise", up_opt.noise, "relative std of noise added to each expert copy")
      ->check(CLI::NonNegativeNumber);
  up->add_option("--seed", up_opt.seed, "seed for the router initialisation and the noise");

  // eval
  auto* eval = app.add_subcommand("eval", "evaluate a checkpoint: perplexity and routing measures");
  std::string ckpt_dir, split = "validation";
  eval->add_option("--checkpoint", ckpt_dir, "checkpoint folder")->required();
  eval->add_option("--split", split, "validation or heldout")
      ->check(CLI::IsMember({"validation", "heldout"}));
  int64_t eval_batches = 0;
  eval->add_option("--batches", eval_batches, "batches to evaluate (0 = the whole split)");
  InstructEvalOptions ieval;
  std::string eval_json;
  eval->add_option("--per-task", ieval.per_task,
                   "instruction data: samples scored per task (0 = all; docs/instruct-data.md)")
      ->check(CLI::NonNegativeNumber);
  eval->add_option("--max-new-tokens", ieval.max_new_tokens,
                   "instruction data: greedy generation stops at </s> or after this many tokens")
      ->check(CLI::PositiveNumber);
  eval->add_option("--json", eval_json, "instruction data: write the task scores to this JSON file");

  // generate
  auto* gen = app.add_subcommand("generate", "generate text from a checkpoint (KV cache)");
  std::string prompt;
  GenerateOptions gopt;
  gen->add_option("--checkpoint", ckpt_dir, "checkpoint folder")->required();
  gen->add_option("--prompt", prompt, "the text to continue")->required();
  gen->add_option("--max-tokens", gopt.max_tokens, "new tokens at most")->check(CLI::PositiveNumber);
  gen->add_option("--temperature", gopt.temperature, "sampling temperature (0 = greedy)")
      ->check(CLI::NonNegativeNumber);
  gen->add_option("--top-p", gopt.top_p, "nucleus sampling mass")->check(CLI::Range(0.0, 1.0));
  gen->add_option("--seed", gopt.seed, "sampling seed");
  bool gen_ignore_eos = false, gen_timing = false;
  gen->add_flag("--ignore-eos", gen_ignore_eos, "generate --max-tokens tokens even past </s>");
  gen->add_flag("--timing", gen_timing, "print prefill and decode speed to stderr (docs/interop.md)");

  // inspect
  auto* inspect = app.add_subcommand("inspect", "model summary and per-layer / per-expert utilisation");
  inspect->add_option("--checkpoint", ckpt_dir, "checkpoint folder")->required();

  // prune
  auto* prune = app.add_subcommand(
      "prune", "remove experts under a validation load share from routing; report the perplexity change");
  PruneOptions prune_opt;
  prune->add_option("--checkpoint", prune_opt.checkpoint, "checkpoint folder")->required();
  prune
      ->add_option("--min-load", prune_opt.min_load,
                   "prune experts whose load share is below this, in [0, 1)")
      ->required();
  prune->add_option("--out", prune_opt.out_dir, "the pruned checkpoint folder")->required();
  prune->add_option("--batches", prune_opt.eval_batches,
                    "validation batches to measure (0 = the whole split)");

  // bench
  auto* bench = app.add_subcommand(
      "bench", "MoE layer vs dense-equivalent FFN vs plain expert loop (docs/performance.md)");
  std::string json_path, shapes_csv;
  LayerBenchOptions bench_opt;
  bench->add_option("--json", json_path, "write the results as JSON to this file");
  bench->add_option("--reps", bench_opt.reps, "timed repetitions per variant")->check(CLI::Range(1, 1000));
  std::string shape_names;
  for (auto& s : default_bench_shapes()) shape_names += (shape_names.empty() ? "" : ",") + s.name;
  bench->add_option("--shapes", shapes_csv, "comma-separated subset of: " + shape_names);
  std::string directions_csv;
  bench->add_option("--directions", directions_csv,
                    "comma-separated subset of: forward,forward_backward (default: both)");
  bool bench_train = false;
  TrainBenchOptions train_bench_opt;
  bench->add_flag("--train", bench_train,
                  "instead of the layer: end-to-end training steps/s of a config, fused vs plain experts, "
                  "and the machine's sgemm FLOP/s, interleaved (--reps steps each)");
  bool bench_profile = false;
  bench->add_flag("--profile", bench_profile,
                  "with --train: where a training step goes, by op category (attention, norms, routing, "
                  "experts, ...; docs/performance.md), over --reps steps");
  bench->add_option("--config", train_bench_opt.config, "with --train: TOML config (default: embedded)")
      ->check(CLI::ExistingFile);
  bench->add_option("--set", train_bench_opt.overrides, "with --train: override a config key, key=value");
  std::string bench_compare, bench_scale;
  bench
      ->add_option("--compare", bench_compare,
                   "training throughput of a comparison config's variants, interleaved in one process "
                   "(docs/comparison.md)")
      ->check(CLI::ExistingFile);
  bench->add_option("--routing-scale", bench_scale,
                    "route() and layer cost of topk vs hierarchical at these E, e.g. 16,64,256");
  bool bench_scaling = false, bench_quick = false;
  std::string bench_plot;
  bench->add_flag("--scaling", bench_scaling,
                  "time per layer step and per route() as T, E and K grow, with the fitted growth "
                  "(docs/performance.md, \"Scaling\")");
  bench->add_option("--plot", bench_plot, "with --scaling or --dist: write the plot to this PNG");
  bench->add_flag("--quick", bench_quick,
                  "with --scaling: only the two smallest points of each sweep; with --dist: the default "
                  "model only");
  bool bench_dist = false;
  DistBenchOptions dist_opt;
  bench->add_flag("--dist", bench_dist,
                  "training steps at 1 rank x T threads against 2 ranks x T/2 (data parallel, with and "
                  "without the gradient all-reduce overlapped, and expert parallel), for the default and a "
                  "wider model: tokens/s, bytes and time of the collectives (docs/distributed.md); --reps "
                  "sets the steps per run (default 30), --threads T (default: the cores available)");
  bench->add_option("--rounds", dist_opt.rounds, "with --dist: each setting runs once per round (default 2)")
      ->check(CLI::Range(1, 100));

  // info
  auto* info = app.add_subcommand(
      "info", "the machine line of bench and reports, the CPU's vector features and OpenBLAS's core");
  int64_t info_sgemm = 0;
  int info_reps = 5;
  info->add_option("--sgemm", info_sgemm, "also time an N x N x N float matrix product (e.g. 2048)")
      ->check(CLI::Range(int64_t(1), int64_t(16384)));
  info->add_option("--reps", info_reps, "with --sgemm: timed repetitions (median reported)")
      ->check(CLI::Range(1, 1000));

  // compare
  auto* cmp = app.add_subcommand("compare",
                                 "train one model per router on the same data and compute; "
                                 "compare.md + plots (docs/comparison.md)");
  std::string cmp_config, cmp_routers, cmp_out = "runs/compare", cmp_seeds, cmp_variants,
                                       cmp_scale = "16,64,256";
  std::vector<std::string> cmp_overrides;
  cmp->add_option("--config", cmp_config,
                  "TOML config file with optional [compare] seeds and [[compare.variant]]s "
                  "(e.g. configs/compare.toml)")
      ->check(CLI::ExistingFile);
  cmp->add_option("--routers", cmp_routers,
                  "without variants in the config: one variant per router, comma-separated (default: all)");
  cmp->add_option("--variants", cmp_variants, "run only these variants of the config (comma-separated)");
  cmp->add_option("--seeds", cmp_seeds,
                  "seeds of every variant without its own, e.g. 1,2,3 (default: 1,2,3)");
  cmp->add_option("--set", cmp_overrides,
                  "override a config key for every run: section.key=value (repeatable)");
  bool cmp_render = false, cmp_no_bench = false;
  cmp->add_flag("--render-only", cmp_render, "redraw report.md and plots from --out's compare.json");
  cmp->add_flag("--no-bench", cmp_no_bench, "skip the throughput and routing-scale phases");
  cmp->add_option("--routing-scale", cmp_scale, "the E of the routing-scale phase (comma-separated)");
  int cmp_bench_steps = 8;
  cmp->add_option("--bench-steps", cmp_bench_steps, "timed steps per variant of the throughput phase")
      ->check(CLI::Range(1, 1000));
  cmp->add_option("--out", cmp_out,
                  "folder for report.md, compare.json, plots/ and one run folder per variant and seed");

  // export (docs/interop.md)
  auto* export_cmd =
      app.add_subcommand("export", "write a checkpoint as GGUF (llama.cpp) or a Hugging Face folder");
  ExportOptions exp_opt;
  export_cmd->add_option("--checkpoint", exp_opt.checkpoint, "checkpoint folder")->required();
  export_cmd->add_option("--format", exp_opt.format, "gguf or hf")->required();
  export_cmd->add_option("--out", exp_opt.out, "the GGUF file, or the Hugging Face folder")->required();
  export_cmd->add_option("--dtype", exp_opt.dtype,
                         "weights: f32 or f16 (gguf also q8_0, hf also bf16; default f32)");
  int64_t shard_mb = 0;
  export_cmd->add_option("--shard-mb", shard_mb, "hf: shard the weights above this many MiB (default 4096)")
      ->check(CLI::PositiveNumber);

  // import (docs/interop.md)
  auto* import_cmd =
      app.add_subcommand("import", "read a Hugging Face Llama or Mixtral folder into a checkpoint");
  std::string import_format, import_from, import_out;
  import_cmd->add_option("--format", import_format, "hf")->required()->check(CLI::IsMember({"hf"}));
  import_cmd->add_option("--from", import_from, "the Hugging Face folder")->required();
  import_cmd->add_option("--out", import_out, "the new checkpoint folder")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    init_threads(threads);
    if (train->parsed()) {
      RunConfig cfg;
      if (!resume.empty()) {
        // The checkpoint's config is the run's; --set may change only how long and how often
        // (train_model checks the keys).
        if (!config_path.empty())
          throw ConfigError("--config",
                            "cannot be combined with --resume: the run continues the checkpoint's "
                            "configuration (change train.steps or the cadences with --set)");
      } else if (!init_from.empty() && config_path.empty()) {
        const auto ckpt = load_checkpoint(init_from);
        cfg = load_run_config_text(ckpt.config_toml, init_from + "/config.toml", overrides);
      } else {
        cfg = load_run_config(config_path, overrides);
      }
      if (threads > 0) cfg.train.threads = threads;
      TrainOptions opt;
      opt.out_dir = out_dir;
      opt.resume = resume;
      if (!resume.empty()) opt.resume_overrides = overrides;
      opt.stop_after = stop_after;
      opt.init_from = init_from;
      // SIGINT / SIGTERM: finish the step, checkpoint it, exit 128 + signal (docs/reliability.md).
      install_stop_handlers();
      opt.stop_on_signal = true;
      // Past one process (docs/distributed.md): mpirun's or torchrun-style variables make this process
      // one rank of a group; without them it trains alone.
      dist::init(dist::launch_env_from_environment());
      if (dist::rank() != 0) no_report = true;  // rank 0 writes the run folder
      auto summary = train_model(cfg, opt, std::cout);
      dist::shutdown();
      if (summary.interrupted_by) {
        std::cerr << "moeforge: interrupted by " << (summary.interrupted_by == SIGINT ? "SIGINT" : "SIGTERM")
                  << " after step " << summary.step << "; checkpoint " << summary.checkpoint
                  << "\nmoeforge: resume with: " << argv[0] << " train --resume "
                  << (fs::path(out_dir) / "checkpoints").string() << " --out " << out_dir << "\n";
        return 128 + summary.interrupted_by;
      }
      if (!no_report) {
        auto lm = load_model(summary.checkpoint);
        const std::string tok = lm.tokenizer->serialized();
        DataBundle data = prepare_data(lm.cfg.data, &tok, std::cout);
        const double unigram =
            unigram_perplexity(data.train.tokens, data.validation.tokens, lm.tokenizer->vocab_size());
        GenerateOptions g;
        g.max_tokens = 48;
        g.seed = 7;
        const std::string sample = sample_text(lm, "The jury said", g);
        std::cout << "sample: " << sample << "\n";
        auto counts = count_model(*lm.model);
        ReportInputs rin;
        rin.run_dir = out_dir;
        rin.title = "moeforge run: " + lm.cfg.moe.router + " router, " +
                    std::to_string(lm.cfg.moe.routed_experts()) + " experts, top-" +
                    std::to_string(lm.cfg.moe.routed_used());
        rin.facts = {{"steps", std::to_string(summary.step)},
                     {"parameters (total / active per token)",
                      std::to_string(counts.total_params) + " / " + std::to_string(counts.active_params)},
                     {"training throughput",
                      fixed(summary.tokens_per_s, 0) + " tokens/s (" + describe_machine() + ")"},
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
    } else if (up->parsed()) {
      std::cout << upcycle(up_opt) << "\n";
    } else if (eval->parsed()) {
      auto lm = load_model(ckpt_dir);
      const std::string tok = lm.tokenizer->serialized();
      DataBundle data = prepare_data(lm.cfg.data, &tok, std::cout);
      const PackedData& set = split == "heldout" ? data.heldout : data.validation;
      if (!set.tokens.defined() || set.size() == 0)
        throw ConfigError("data.heldout_genres",
                          "this checkpoint's config has no held-out genres to evaluate");
      print_eval(evaluate(lm.model, set, lm.cfg.train.batch_size, eval_batches, split));
      if (data.instruct) {
        // Task scores: the validation samples (trained tasks), or with --split heldout the test samples,
        // which hold every trained task's test samples and the held-out tasks (docs/instruct-data.md).
        const auto& samples = split == "heldout" ? data.instruct->test : data.instruct->validation;
        ieval.batch_size = lm.cfg.train.batch_size;
        auto r = evaluate_instruct(lm.model, *lm.tokenizer, *data.instruct, samples, ieval);
        std::cout << "\n" << format_instruct_eval(r);
        if (!eval_json.empty()) {
          write_file_atomic(eval_json, r.to_json().dump(2) + "\n");
          std::cout << "task scores: " << eval_json << "\n";
        }
      }
    } else if (gen->parsed()) {
      auto lm = load_model(ckpt_dir);
      std::cout << sample_text(lm, prompt, gopt, gen_ignore_eos, gen_timing) << "\n";
    } else if (inspect->parsed()) {
      auto lm = load_model(ckpt_dir);
      auto c = count_model(*lm.model);
      const auto& m = lm.cfg.model;
      std::cout << "checkpoint " << lm.dir << " (step " << lm.step << ")\n"
                << "model: " << m.n_layer << " layers, d_model " << m.d_model << ", " << m.n_head
                << " heads, vocab " << m.vocab_size << ", context " << m.max_seq_len << ", MoE every "
                << m.moe_every << " layer(s)\n"
                << "moe: router " << lm.cfg.moe.router << ", " << lm.cfg.moe.routed_experts()
                << " experts of width " << lm.cfg.moe.routed_width() << ", top-" << lm.cfg.moe.routed_used()
                << ", " << lm.cfg.moe.n_shared_expert << " shared\n"
                << "parameters: " << c.total_params << " total, " << c.active_params << " active per token ("
                << c.embedding_params << " in the embedding); " << fixed(c.flops_per_token / 1e6, 2)
                << " MFLOP per token (forward)\n";
      std::cout << "\nshapes:\n";
      for (auto& p : lm.model->named_parameters())
        std::cout << "  " << p.key() << " " << p.value().sizes() << "\n";
      for (auto& b : lm.model->named_buffers())
        std::cout << "  " << b.key() << " " << b.value().sizes() << " (state)\n";
      const std::string tok = lm.tokenizer->serialized();
      DataBundle data = prepare_data(lm.cfg.data, &tok, std::cout);
      auto r = evaluate(lm.model, data.validation, lm.cfg.train.batch_size, 8, "validation");
      std::cout << "\nutilisation on " << r.tokens << " validation tokens:\n";
      for (size_t l = 0; l < r.layers.size(); ++l) {
        const auto& L = r.layers[l];
        int64_t total = 0;
        for (auto x : L.load) total += x;
        std::cout << "  MoE layer " << l << " (MaxVio " << fixed(L.max_vio_global, 3) << "):";
        for (size_t e = 0; e < L.load.size(); ++e)
          std::cout << " e" << e << "="
                    << fixed(100.0 * double(L.load[e]) / double(std::max<int64_t>(total, 1)), 1) << "%";
        std::cout << "\n";
        print_router_state(*lm.model->moe_layers().at(l)->router, l);
      }
      print_cluster_table(r);
    } else if (export_cmd->parsed()) {
      exp_opt.max_shard_bytes = uint64_t(shard_mb) << 20;
      export_checkpoint(exp_opt, std::cout);
    } else if (import_cmd->parsed()) {
      import_hf(import_from, import_out, std::cout);
    } else if (prune->parsed()) {
      prune_checkpoint(prune_opt, std::cout);
    } else if (cmp->parsed() && cmp_render) {
      const auto path = fs::path(cmp_out) / "compare.json";
      std::ifstream in(path);
      if (!in) throw FileError(path.string(), "cannot read");
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(in);
      } catch (const nlohmann::json::exception& e) {
        throw FileError(path.string(), std::string("not JSON: ") + e.what());
      }
      std::cout << "wrote " << write_compare_outputs(cmp_out, j) << "\n";
    } else if (cmp->parsed()) {
      CompareOptions copt;
      copt.out_dir = cmp_out;
      copt.command = "moeforge";
      for (int i = 1; i < argc; ++i) copt.command += std::string(" ") + argv[i];
      std::vector<std::string> routers;
      if (!cmp_routers.empty()) routers = parse_router_list(cmp_routers);
      ComparePlan plan = load_compare_plan(cmp_config, cmp_overrides, routers);
      if (threads > 0) plan.base.train.threads = threads;
      resolve_compare_plan(plan, cmp_variants,
                           cmp_seeds.empty() ? std::vector<int64_t>{} : parse_seed_list(cmp_seeds));
      const auto scale = parse_seed_list(cmp_scale, "--routing-scale");
      if (!cmp_no_bench) {
        copt.throughput = [&](const std::vector<CompareVariant>& v, std::ostream& log) {
          return run_variant_throughput(v, cmp_bench_steps, log);
        };
        copt.routing_scale = [&](std::ostream& log) {
          return run_routing_scale(scale, cmp_bench_steps, log);
        };
      }
      // SIGINT / SIGTERM: the running variant checkpoints its step; a rerun continues (docs/comparison.md).
      install_stop_handlers();
      const auto result = run_compare(plan, copt, std::cout);
      if (result.contains("interrupted_by")) return 128 + result["interrupted_by"].get<int>();
    } else if (info->parsed()) {
      if (info->count("--reps") > 0 && info_sgemm == 0)
        throw ConfigError("--reps", "applies only with --sgemm");
      const CpuFeatures f = read_cpu_features();
      std::cout << "machine: " << describe_machine() << "\n"
                << "cpu: " << (f.vendor.empty() ? "unknown vendor" : f.vendor);
      for (const auto& [name, has] : {std::pair{"avx", f.avx},
                                      {"avx2", f.avx2},
                                      {"fma", f.fma},
                                      {"avx512f", f.avx512f},
                                      {"avx512bw", f.avx512bw},
                                      {"avx512dq", f.avx512dq},
                                      {"avx512vl", f.avx512vl},
                                      {"os-avx", f.os_avx},
                                      {"os-avx512", f.os_avx512}})
        if (has) std::cout << " " << name;
      const std::string core = openblas_core();
      std::cout << " (vector level " << cpu_vector_level(f) << ")\n"
                << "openblas core: " << (core.empty() ? "none" : core) << " (vector level "
                << blas_core_level(core) << ")\n";
      // Which SentencePiece module a moved or installed binary found (docs/interop.md).
      try {
        std::cout << "tokenizer module: " << tokenizer_module_path() << "\n";
      } catch (const std::exception& e) {
        std::cout << "tokenizer module: none loads: " << e.what() << "\n";
      }
      if (info_sgemm > 0) {
        auto a = torch::randn({info_sgemm, info_sgemm}), b = torch::randn({info_sgemm, info_sgemm});
        auto c = torch::empty({info_sgemm, info_sgemm});
        auto t = bench::interleaved({{"sgemm", [&] { at::mm_out(c, a, b); }}}, info_reps);
        const double n = double(info_sgemm);
        std::cout << "sgemm " << info_sgemm
                  << "^3: " << fixed(2.0 * n * n * n / (t["sgemm"].median() * 1e-3) * 1e-9, 1)
                  << " GFLOP/s (median of " << info_reps << ", " << fixed(t["sgemm"].min(), 1) << "-"
                  << fixed(t["sgemm"].max(), 1) << " ms)\n";
      }
    } else if (bench->parsed()) {
      bench_opt.shapes = split_csv(shapes_csv);
      for (auto& s : bench_opt.shapes) {
        bool ok = false;
        for (auto& d : default_bench_shapes()) ok = ok || d.name == s;
        if (!ok) throw ConfigError("--shapes", "unknown shape '" + s + "' (expected " + shape_names + ")");
      }
      if (bench_train && !shapes_csv.empty()) throw ConfigError("--shapes", "does not apply to --train");
      if (!directions_csv.empty()) {
        if (bench_train) throw ConfigError("--directions", "does not apply to --train");
        bench_opt.directions = split_csv(directions_csv);
        for (auto& d : bench_opt.directions)
          if (d != "forward" && d != "forward_backward")
            throw ConfigError("--directions",
                              "unknown direction '" + d + "' (expected forward,forward_backward)");
      }
      if (bench_dist && (bench_train || !bench_compare.empty() || !bench_scale.empty() || bench_scaling ||
                         !shapes_csv.empty() || !train_bench_opt.config.empty()))
        throw ConfigError("--dist",
                          "goes alone (not with --train, --compare, --routing-scale, --scaling, --shapes or "
                          "--config; --set applies to every run)");
      if (!bench_dist && bench->count("--rounds") > 0)
        throw ConfigError("--rounds", "applies only with --dist");
      if (!bench_train && bench_compare.empty() && !bench_dist &&
          (!train_bench_opt.config.empty() || !train_bench_opt.overrides.empty()))
        throw ConfigError(train_bench_opt.config.empty() ? "--set" : "--config", "applies only with --train");
      if (bench_profile && !bench_train) throw ConfigError("--profile", "applies only with --train");
      if (!bench_compare.empty() && bench_train) throw ConfigError("--compare", "does not go with --train");
      if (!bench_scale.empty() && (bench_train || !bench_compare.empty()))
        throw ConfigError("--routing-scale", "goes alone (not with --train or --compare)");
      if (bench_scaling &&
          (bench_train || !bench_compare.empty() || !bench_scale.empty() || !shapes_csv.empty()))
        throw ConfigError("--scaling",
                          "goes alone (not with --train, --compare, --routing-scale or --shapes)");
      if (!bench_scaling && !bench_dist && (!bench_plot.empty() || bench_quick))
        throw ConfigError(bench_plot.empty() ? "--quick" : "--plot", "applies only with --scaling or --dist");
      std::cout << "moeforge bench: " << describe_machine() << "\n";
      train_bench_opt.steps = bench_opt.reps;
      nlohmann::json result;
      if (!bench_compare.empty()) {
        ComparePlan plan = load_compare_plan(bench_compare, train_bench_opt.overrides);
        if (threads > 0) plan.base.train.threads = threads;
        resolve_compare_plan(plan);
        std::vector<CompareVariant> main;
        for (auto& v : plan.variants)
          if (!v.fault.active()) main.push_back(v);
        result = run_variant_throughput(main, bench_opt.reps, std::cout);
      } else if (!bench_scale.empty()) {
        result =
            run_routing_scale(parse_seed_list(bench_scale, "--routing-scale"), bench_opt.reps, std::cout);
      } else if (bench_dist) {
        dist_opt.steps = bench->count("--reps") > 0 ? bench_opt.reps : 30;
        dist_opt.threads = threads > 0 ? threads : std::max(2, init_threads(0) / 2 * 2);
        dist_opt.overrides = train_bench_opt.overrides;
        dist_opt.plot = bench_plot;
        dist_opt.quick = bench_quick;
        result = run_dist_bench(dist_opt, std::cout);
      } else if (bench_scaling) {
        result = run_scaling_bench(bench_opt.reps, bench_quick, std::cout);
        if (!bench_plot.empty()) {
          plot_scaling_bench(result, bench_plot);
          std::cout << "wrote " << bench_plot << "\n";
        }
      } else {
        result = bench_profile ? run_train_profile(train_bench_opt, std::cout)
                 : bench_train ? run_train_bench(train_bench_opt, std::cout)
                               : run_layer_bench(bench_opt, std::cout);
      }
      if (!json_path.empty()) {
        write_file_atomic(json_path, result.dump(2) + "\n");
        std::cout << "wrote " << json_path << "\n";
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "moeforge: error: " << e.what() << "\n";
    if (dist::active()) {
      // A rank of a failed group leaves at once: c10d's threads may still wait on a peer that is gone,
      // and the exit must come within the bound docs/distributed.md states. Checkpoints are atomic.
      std::cout.flush();
      std::cerr.flush();
      std::_Exit(1);
    }
    return 1;
  }
  return 0;
}
