// moeforge compare: one model per router variant on the same data and compute, report.md and plots
// (docs/comparison.md).
#include <filesystem>
#include <fstream>
#include <iostream>

#include "bench/layer_bench.h"
#include "bench/train_bench.h"
#include "command.h"
#include "moeforge/experiments/compare.h"
#include "moeforge/util/error.h"
#include "moeforge/util/interrupt.h"

namespace fs = std::filesystem;

namespace moeforge::cli {

namespace {

struct CompareArgs {
  std::string config, routers, out = "runs/compare", seeds, variants, scale = "16,64,256", reuse;
  std::vector<std::string> overrides;
  bool render_only = false, no_bench = false;
  int bench_steps = 8;
};

// report.md and plots again from --out's compare.json.
int render_only(const CompareArgs& a) {
  const auto path = fs::path(a.out) / "compare.json";
  std::ifstream in(path);
  if (!in) throw FileError(path.string(), "cannot read");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(path.string(), std::string("not JSON: ") + e.what());
  }
  std::cout << "wrote " << write_compare_outputs(a.out, j) << "\n";
  return 0;
}

int run_compare_command(const CompareArgs& a, const Globals& g) {
  if (a.render_only) return render_only(a);
  CompareOptions copt;
  copt.out_dir = a.out;
  copt.command = "moeforge" + g.arguments;
  copt.reuse = a.reuse;
  std::vector<std::string> routers;
  if (!a.routers.empty()) routers = parse_router_list(a.routers);
  ComparePlan plan = load_compare_plan(a.config, a.overrides, routers);
  if (g.threads > 0) plan.base.train.threads = g.threads;
  resolve_compare_plan(plan, a.variants, a.seeds.empty() ? std::vector<int64_t>{} : parse_seed_list(a.seeds));
  const auto scale = parse_seed_list(a.scale, "--routing-scale");
  const int steps = a.bench_steps;
  if (!a.no_bench) {
    copt.throughput = [steps](const std::vector<CompareVariant>& v, std::ostream& log) {
      return run_variant_throughput(v, steps, log);
    };
    copt.routing_scale = [scale, steps](std::ostream& log) { return run_routing_scale(scale, steps, log); };
  }
  // SIGINT / SIGTERM: the running variant checkpoints its step; a rerun continues (docs/comparison.md).
  install_stop_handlers();
  const auto result = run_compare(plan, copt, std::cout);
  if (result.contains("interrupted_by")) return 128 + result["interrupted_by"].get<int>();
  return 0;
}

}  // namespace

Command add_compare(CLI::App& app, const Globals& g) {
  auto a = std::make_shared<CompareArgs>();
  auto* c = app.add_subcommand("compare",
                               "train one model per router on the same data and compute; "
                               "compare.md + plots (docs/comparison.md)");
  c->add_option("--config", a->config,
                "TOML config file with optional [compare] seeds and [[compare.variant]]s "
                "(e.g. configs/compare.toml)")
      ->check(CLI::ExistingFile);
  c->add_option("--routers", a->routers,
                "without variants in the config: one variant per router, comma-separated (default: all)");
  c->add_option("--variants", a->variants, "run only these variants of the config (comma-separated)");
  c->add_option("--seeds", a->seeds, "seeds of every variant without its own, e.g. 1,2,3 (default: 1,2,3)");
  c->add_option("--set", a->overrides, "override a config key for every run: section.key=value (repeatable)");
  c->add_flag("--render-only", a->render_only, "redraw report.md and plots from --out's compare.json");
  c->add_option(
       "--reuse", a->reuse,
       "an earlier compare.json: take its finished runs of this plan's (variant, seed)s made with the "
       "same config (keys added to moeforge since aside) instead of training them again")
      ->check(CLI::ExistingFile);
  c->add_flag("--no-bench", a->no_bench, "skip the throughput and routing-scale phases");
  c->add_option("--routing-scale", a->scale, "the E of the routing-scale phase (comma-separated)");
  c->add_option("--bench-steps", a->bench_steps, "timed steps per variant of the throughput phase")
      ->check(CLI::Range(1, 1000));
  c->add_option("--out", a->out,
                "folder for report.md, compare.json, plots/ and one run folder per variant and seed");
  return {c, [a, &g] { return run_compare_command(*a, g); }};
}

}  // namespace moeforge::cli
