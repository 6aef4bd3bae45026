// The MoE layer comparison of docs/performance.md ("Definitions", method): the layer against a dense FFN
// doing the same work (dense-equivalent ratio) and against the plain loop over experts, interleaved, median
// of reps.
#pragma once

#include <nlohmann/json.hpp>

#include <ostream>
#include <string>
#include <vector>

#include "moeforge/layer/experts.h"

namespace moeforge {

struct BenchShape {
  std::string name;
  int64_t T, C, F, E, K;
  ExpertAct act = ExpertAct::kSwiGLU;
  bool by_default = true;  // run when --shapes is not given
};

struct LayerBenchOptions {
  int reps = 5;                     // timed repetitions per variant (after one warm-up)
  std::vector<std::string> shapes;  // names from default_bench_shapes(); empty = those run by default
  std::vector<std::string> routings = {"uniform", "skewed"};
  std::vector<std::string> directions = {"forward", "forward_backward"};
  bool router_costs = true;  // every router on the top-2 shape, as a ratio to the topk router
};

// The shapes of docs/performance.md, then top2_gelu (GELU experts of twice the width, the same FLOPs as
// top2's SwiGLU; Switch and GShard use GELU), run only when named in --shapes.
std::vector<BenchShape> default_bench_shapes();

// Runs the comparison and returns {"machine", "results": [...], "router_costs": [...]}; prints a table to
// `log` as it goes.
nlohmann::json run_layer_bench(const LayerBenchOptions& opt, std::ostream& log);

}  // namespace moeforge
