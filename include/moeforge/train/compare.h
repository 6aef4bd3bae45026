// Side-by-side router comparison (`moeforge compare`): one model per router, trained on the same data with
// the same seed, steps and model shape, and the same active expert compute per token; then the measures of
// docs/routing.md section 9 for each, written as compare.json and compare.md with gnuplot PNG plots.
#pragma once

#include <nlohmann/json.hpp>

#include <ostream>
#include <string>
#include <vector>

#include "moeforge/config/run_config.h"

namespace moeforge {

struct CompareOptions {
  std::vector<std::string> routers;  // moe.router values, in the order they run; empty = every router
  std::string out_dir = "runs/compare";
  std::string command;  // the command line, recorded in compare.md / compare.json
  bool progress = true;
  bool plots = true;  // compare.md's PNGs and each run's report (gnuplot); tests may turn them off
};

// `base` with moe.router = `router` and the router's own options set so that every token gets
// base.moe.n_expert_used expert assignments on average (K):
//   topk, loss_free, bip: top-K as configured;
//   expert_choice: ec_capacity_factor = K (each expert takes T*K/E tokens);
//   hierarchical: n_cluster_used * n_expert_used = K (K_c = the smallest divisor of K that fits);
//   moce: K inside the sequence's group, less the general experts' share when there are any.
// `how` (if given) receives a one-line description of what was set. Throws ConfigError when K cannot be
// met with the router's shape (e.g. hierarchical with K > experts per cluster * clusters).
RunConfig equal_compute_config(const RunConfig& base, const std::string& router, std::string* how = nullptr);

// Parses "a,b,c" into router names, checking each against available_routers(); an empty string means all
// of them. Throws ConfigError("--routers", ...) naming the bad entry or a duplicate.
std::vector<std::string> parse_router_list(const std::string& csv);

// Trains and measures every router of opt.routers on `base`; writes out_dir/<router>/ (each run),
// out_dir/compare.json, out_dir/compare.md and out_dir/plots/*.png. Returns the JSON written.
nlohmann::json run_compare(const RunConfig& base, const CompareOptions& opt, std::ostream& log);

// compare.md (and plots/*.png when `plots`) from a comparison's JSON, as run_compare writes them: lets the
// figures be redrawn from out_dir/compare.json without training again. Returns the path of compare.md.
std::string write_compare_outputs(const std::string& out_dir, const nlohmann::json& result,
                                  bool plots = true);

}  // namespace moeforge
