// moeforge bench: the layer benchmark, end-to-end training steps, routing cost against E, scaling sweeps,
// a comparison's throughput, and one rank against two (docs/performance.md, docs/distributed.md). Figures
// are ratios measured in one run.
#include <iostream>

#include "bench/dist_bench.h"
#include "bench/layer_bench.h"
#include "bench/train_bench.h"
#include "cli_util.h"
#include "command.h"
#include "moeforge/experiments/compare.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/runtime.h"

namespace moeforge::cli {

namespace {

struct BenchArgs {
  std::string json, shapes, directions, compare, routing_scale, plot;
  LayerBenchOptions layer;
  TrainBenchOptions train_opt;
  DistBenchOptions dist_opt;
  bool train = false, profile = false, scaling = false, quick = false, dist = false;
};

std::string shape_names() {
  std::string names;
  for (auto& s : default_bench_shapes()) names += (names.empty() ? "" : ",") + s.name;
  return names;
}

// The layer benchmark's own flags, and which modes go together.
void check_layer_flags(BenchArgs& a) {
  a.layer.shapes = split_csv(a.shapes);
  for (auto& s : a.layer.shapes) {
    bool ok = false;
    for (auto& d : default_bench_shapes()) ok = ok || d.name == s;
    if (!ok) throw ConfigError("--shapes", "unknown shape '" + s + "' (expected " + shape_names() + ")");
  }
  if (a.train && !a.shapes.empty()) throw ConfigError("--shapes", "does not apply to --train");
  if (!a.directions.empty()) {
    if (a.train) throw ConfigError("--directions", "does not apply to --train");
    a.layer.directions = split_csv(a.directions);
    for (auto& d : a.layer.directions)
      if (d != "forward" && d != "forward_backward")
        throw ConfigError("--directions",
                          "unknown direction '" + d + "' (expected forward,forward_backward)");
  }
}

void check_mode_flags(const BenchArgs& a, const CLI::App& c) {
  if (a.dist && (a.train || !a.compare.empty() || !a.routing_scale.empty() || a.scaling ||
                 !a.shapes.empty() || !a.train_opt.config.empty()))
    throw ConfigError(
        "--dist",
        "goes alone (not with --train, --compare, --routing-scale, --scaling, --shapes or --config; "
        "--set applies to every run)");
  if (!a.dist && c.count("--rounds") > 0) throw ConfigError("--rounds", "applies only with --dist");
  if (!a.train && a.compare.empty() && !a.dist &&
      (!a.train_opt.config.empty() || !a.train_opt.overrides.empty()))
    throw ConfigError(a.train_opt.config.empty() ? "--set" : "--config", "applies only with --train");
  if (a.profile && !a.train) throw ConfigError("--profile", "applies only with --train");
  if (!a.compare.empty() && a.train) throw ConfigError("--compare", "does not go with --train");
  if (!a.routing_scale.empty() && (a.train || !a.compare.empty()))
    throw ConfigError("--routing-scale", "goes alone (not with --train or --compare)");
  if (a.scaling && (a.train || !a.compare.empty() || !a.routing_scale.empty() || !a.shapes.empty()))
    throw ConfigError("--scaling", "goes alone (not with --train, --compare, --routing-scale or --shapes)");
  if (!a.scaling && !a.dist && (!a.plot.empty() || a.quick))
    throw ConfigError(a.plot.empty() ? "--quick" : "--plot", "applies only with --scaling or --dist");
}

nlohmann::json run_mode(BenchArgs& a, const CLI::App& c, const Globals& g) {
  if (!a.compare.empty()) {
    ComparePlan plan = load_compare_plan(a.compare, a.train_opt.overrides);
    if (g.threads > 0) plan.base.train.threads = g.threads;
    resolve_compare_plan(plan);
    std::vector<CompareVariant> main;
    for (auto& v : plan.variants)
      if (!v.fault.active()) main.push_back(v);
    return run_variant_throughput(main, a.layer.reps, std::cout);
  }
  if (!a.routing_scale.empty())
    return run_routing_scale(parse_seed_list(a.routing_scale, "--routing-scale"), a.layer.reps, std::cout);
  if (a.dist) {
    a.dist_opt.steps = c.count("--reps") > 0 ? a.layer.reps : 30;
    a.dist_opt.threads = g.threads > 0 ? g.threads : std::max(2, init_threads(0) / 2 * 2);
    a.dist_opt.overrides = a.train_opt.overrides;
    a.dist_opt.plot = a.plot;
    a.dist_opt.quick = a.quick;
    return run_dist_bench(a.dist_opt, std::cout);
  }
  if (a.scaling) {
    auto result = run_scaling_bench(a.layer.reps, a.quick, std::cout);
    if (!a.plot.empty()) {
      plot_scaling_bench(result, a.plot);
      std::cout << "wrote " << a.plot << "\n";
    }
    return result;
  }
  return a.profile ? run_train_profile(a.train_opt, std::cout)
         : a.train ? run_train_bench(a.train_opt, std::cout)
                   : run_layer_bench(a.layer, std::cout);
}

int run_bench(BenchArgs& a, const CLI::App& c, const Globals& g) {
  check_layer_flags(a);
  check_mode_flags(a, c);
  std::cout << "moeforge bench: " << describe_machine() << "\n";
  a.train_opt.steps = a.layer.reps;
  const nlohmann::json result = run_mode(a, c, g);
  if (!a.json.empty()) {
    write_file_atomic(a.json, result.dump(2) + "\n");
    std::cout << "wrote " << a.json << "\n";
  }
  return 0;
}

}  // namespace

Command add_bench(CLI::App& app, const Globals& g) {
  auto a = std::make_shared<BenchArgs>();
  auto* c = app.add_subcommand(
      "bench", "MoE layer vs dense-equivalent FFN vs plain expert loop (docs/performance.md)");
  c->add_option("--json", a->json, "write the results as JSON to this file");
  c->add_option("--reps", a->layer.reps, "timed repetitions per variant")->check(CLI::Range(1, 1000));
  c->add_option("--shapes", a->shapes, "comma-separated subset of: " + shape_names());
  c->add_option("--directions", a->directions,
                "comma-separated subset of: forward,forward_backward (default: both)");
  c->add_flag(
      "--train", a->train,
      "instead of the layer: end-to-end training steps/s of a config, fused vs plain experts, and the "
      "machine's sgemm FLOP/s, interleaved (--reps steps each)");
  c->add_flag(
      "--profile", a->profile,
      "with --train: where a training step goes, by op category (attention, norms, routing, experts, ...; "
      "docs/performance.md), over --reps steps");
  c->add_option("--config", a->train_opt.config, "with --train: TOML config (default: embedded)")
      ->check(CLI::ExistingFile);
  c->add_option("--set", a->train_opt.overrides, "with --train: override a config key, key=value");
  c->add_option("--compare", a->compare,
                "training throughput of a comparison config's variants, interleaved in one process "
                "(docs/comparison.md)")
      ->check(CLI::ExistingFile);
  c->add_option("--routing-scale", a->routing_scale,
                "route() and layer cost of topk vs hierarchical at these E, e.g. 16,64,256");
  c->add_flag("--scaling", a->scaling,
              "time per layer step and per route() as T, E and K grow, with the fitted growth "
              "(docs/performance.md, \"Scaling\")");
  c->add_option("--plot", a->plot, "with --scaling or --dist: write the plot to this PNG");
  c->add_flag(
      "--quick", a->quick,
      "with --scaling: only the two smallest points of each sweep; with --dist: the default model only");
  c->add_flag(
      "--dist", a->dist,
      "training steps at 1 rank x T threads against 2 ranks x T/2 (data parallel, with and without the "
      "gradient all-reduce overlapped, and expert parallel), for the default and a wider model: "
      "tokens/s, bytes and time of the collectives (docs/distributed.md); --reps sets the steps per run "
      "(default 30), --threads T (default: the cores available)");
  c->add_option("--rounds", a->dist_opt.rounds, "with --dist: each setting runs once per round (default 2)")
      ->check(CLI::Range(1, 100));
  return {c, [a, c, &g] { return run_bench(*a, *c, g); }};
}

}  // namespace moeforge::cli
