// Side-by-side router comparison (`moeforge compare`, docs/comparison.md): variants (a router and its own
// config overrides), each trained with several seeds on the same data, with the same steps, model shape and
// active expert compute per token; then the measures of docs/routing.md section 9 for every run, aggregated
// over seeds (mean, standard deviation, min-max) in compare.json and report.md with gnuplot PNG plots.
//
// Resumable: each finished run leaves OUT/<variant>/seed<k>/run.json; a rerun of the same command skips
// those, resumes an interrupted run from its last checkpoint, and starts the rest.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "moeforge/config/run_config.h"

namespace moeforge {

// A fault injected into one routed expert of every MoE layer from training step `step` on: its output rows
// multiplied by `factor` (NaN: replaced by NaN). The reliability experiment of docs/comparison.md.
struct FaultSpec {
  int64_t step = -1;  // -1: no fault
  int64_t expert = 0;
  double factor = 1.0;
  bool active() const { return step >= 0; }
  std::string describe() const;  // "expert 3 x 100 from step 250", "expert 3 NaN from step 250"
};

struct CompareVariant {
  std::string name;                    // its label in every table and plot, and its folder
  std::string router;                  // moe.router
  std::vector<std::string> overrides;  // "section.key=value", applied before the equal-compute rule
  std::vector<int64_t> seeds;          // empty: the comparison's seeds
  FaultSpec fault;
  // The part of the claims (docs/comparison.md) this variant plays, e.g. "balance_loss", "loss_free", "bip",
  // "expert_choice", "expert_choice_noncausal", "moce", "hierarchical", "no_balance", and for the fault
  // experiment "fault_reference" (the fault-free run the faulty runs are held against); empty = none.
  std::string role;
  // "fault" for the fault experiment (a fault, or role fault_reference), else "main" (the tables and claims).
  std::string group() const { return fault.active() || role == "fault_reference" ? "fault" : "main"; }
  // Filled by resolve_compare_plan: base + router + overrides + the equal-compute rule.
  RunConfig cfg;
  std::string equal_compute;  // what the rule set, in words
};

struct ComparePlan {
  RunConfig base;
  std::vector<CompareVariant> variants;
  std::vector<int64_t> seeds = {1, 2, 3};
  std::string source;  // the config file (or "routers") it came from
  // compare.equivalence_ppl: the bound of "equal or better" perplexity claims, as a relative perplexity
  // difference fixed before the run (docs/comparison.md, "Paired statistics").
  double equivalence_ppl = 0.01;
};

struct CompareOptions {
  std::string out_dir = "runs/compare";
  std::string command;  // the command line, recorded in report.md / compare.json
  bool progress = true;
  bool plots = true;  // report.md's PNGs and each run's report (gnuplot); tests may turn them off
  // Stop (as an interruption would) once this many runs have been trained in this call; 0 = never. Tests
  // use it to simulate an interrupted comparison.
  int64_t stop_after_runs = 0;
  // With stop_after_runs: the next run is trained this many steps (and checkpointed) before the stop, as an
  // interruption in the middle of a run would leave it; 0 = not at all.
  int64_t stop_after_steps = 0;
  // Phases after the runs, supplied by the command line (they live in bench/): training throughput of the
  // main variants interleaved in one process, and the routing cost of flat vs hierarchical routing as E
  // grows. Each result is stored in compare.json and kept by a rerun.
  std::function<nlohmann::json(const std::vector<CompareVariant>&, std::ostream&)> throughput;
  std::function<nlohmann::json(std::ostream&)> routing_scale;
  // An earlier comparison's compare.json whose finished runs are taken instead of trained again, for each
  // (variant, seed) of this plan that it holds with the same config (reuse_runs; docs/comparison.md,
  // "Extending a comparison"); empty = none.
  std::string reuse;
};

// A run's fingerprint: its whole config as TOML and its fault; a finished run is kept only under the same.
std::string run_fingerprint(const CompareVariant& v, int64_t seed);

// Whether a run made under fingerprint `before` ran the config of `now` except for keys added to moeforge
// since (every entry of `before` is in `now` with the same value). The keys `now` has and `before` lacks
// go to `added` ("section.key = value"); the first entry that differs, if any, to `differs`.
bool fingerprint_extends(const std::string& before, const std::string& now, std::vector<std::string>* added,
                         std::string* differs = nullptr);

// Copies the runs of the earlier compare.json `reuse` into `out_dir`'s run folders, for every (variant,
// seed) of `plan` without a run.json there whose earlier run passes fingerprint_extends; each copy records
// where it came from and the keys added since ("reused"). Returns how many were copied; says on `log`
// which were and why others were not.
int64_t reuse_runs(const ComparePlan& plan, const std::string& reuse, const std::string& out_dir,
                   std::ostream& log);

// `base` with moe.router = `router` and the router's own options set so that every token gets
// base.moe.n_expert_used expert assignments on average (K): the registry's equal_compute rule
// (routing/registry.h). `how` (if given) receives a one-line description of what was set. Throws
// ConfigError when K cannot be met with the router's shape.
RunConfig equal_compute_config(const RunConfig& base, const std::string& router, std::string* how = nullptr);

// Parses "a,b,c" into router names, checking each against router_names(); an empty string means all of
// them. Throws ConfigError("--routers", ...) naming the bad entry or a duplicate.
std::vector<std::string> parse_router_list(const std::string& csv);

// Parses "1,2,3" into seeds; ConfigError(`flag`, ...) names a bad or repeated entry.
std::vector<int64_t> parse_seed_list(const std::string& csv, const std::string& flag = "--seeds");

// A comparison from a config file: the run config's sections, plus an optional [compare] table:
//   [compare]
//   seeds = [1, 2, 3]
//   [[compare.variant]]
//   name = "top2-switch"          # required, unique, [A-Za-z0-9_.-]
//   router = "topk"               # required
//   set = ["moe.balance_coef=0.01"]
//   seeds = [1]                   # optional: this variant's own seeds
//   role = "balance_loss"         # optional (see CompareVariant::role)
//   fault = { step = 250, expert = 3, factor = 100.0 }   # or factor = "nan"
// Without variants, one variant per router of `routers` (every router when empty), named after it.
// `overrides` (--set) apply to the base config of every variant. Errors name the file and the key.
ComparePlan load_compare_plan(const std::string& path, const std::vector<std::string>& overrides,
                              const std::vector<std::string>& routers = {});

// Applies each variant's router, overrides and the equal-compute rule (fills cfg and equal_compute); keeps
// only the variants named in `only` (comma-separated, empty = all) and sets every variant without its own
// seeds to `seeds` when given. ConfigError names the variant and the key.
void resolve_compare_plan(ComparePlan& plan, const std::string& only = "",
                          const std::vector<int64_t>& seeds = {});

// Trains and measures every (variant, seed) of the plan that has no finished run.json yet (resuming a run
// that was interrupted), runs the throughput and routing-scale phases, writes out_dir/compare.json,
// out_dir/report.md and out_dir/plots/*.png. Returns the JSON written. When stop_after_runs stops it early,
// compare.json holds the finished runs and "complete" is false.
nlohmann::json run_compare(const ComparePlan& plan, const CompareOptions& opt, std::ostream& log);

// report.md (and plots/*.png when `plots`) from a comparison's JSON as run_compare writes it: lets the
// figures be redrawn from out_dir/compare.json without training again (--render-only). Returns the path of
// report.md.
std::string write_compare_outputs(const std::string& out_dir, const nlohmann::json& result,
                                  bool plots = true);

// Mean, sample standard deviation (n - 1; 0 for one value), min, max and count of `v` (non-finite values
// are skipped and counted in `missing`).
struct Spread {
  double mean = 0, sd = 0, min = 0, max = 0;
  int64_t n = 0, missing = 0;
  // Two spreads are resolved apart when their min-max ranges do not overlap (docs/comparison.md).
  bool apart_from(const Spread& o) const { return n > 0 && o.n > 0 && (max < o.min || o.max < min); }
};
Spread spread_of(const std::vector<double>& v);

// "Time to balance" as run.json and the report take it (docs/comparison.md, "Measures"): MaxVio_batch,
// averaged over kBalanceWindow logged steps, stays under kBalanceThreshold. 0.5, not 0.2: random top-2
// routing of a 2,048-token batch over 16 experts already has MaxVio_batch ~0.11 from sampling alone, and
// every balanced router ends at 0.20-0.28, so 0.2 sits at the noise floor.
constexpr double kBalanceThreshold = 0.5;
constexpr size_t kBalanceWindow = 10;

// The first logged step from which MaxVio_batch, as a trailing moving average over `window` logged values
// (1 = the raw values), stays under `threshold` until the end (-1 if its last value is not under it);
// `steps` and `max_vio` are the logged (step, value) pairs in order. The average keeps one lucky batch at
// the end from counting as balance.
int64_t time_to_balance(const std::vector<int64_t>& steps, const std::vector<double>& max_vio,
                        double threshold = 0.2, size_t window = 1);

}  // namespace moeforge
