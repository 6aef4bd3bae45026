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

// Routing cost as the number of experts grows (ClusterMoE's claim, docs/comparison.md): flat top-2 against
// hierarchical routing (G = sqrt(E) clusters rounded to a power of two, 1 cluster x top-2 inside it) at each
// E of `experts`, on T = 2048 tokens (16 x 128) of width C = 128 with experts of width 172 (the comparison's
// model shape): route() alone and the whole layer forward+backward in training mode, interleaved, median
// of `reps`. Returns {"machine", "reps", "T", "C", "F", "points": [{"E", "G", "topk": {"route_ms",
// "layer_ms"}, "hierarchical": {...}}]}.
nlohmann::json run_routing_scale(const std::vector<int64_t>& experts, int reps, std::ostream& log);

// How time grows with the problem (issue 11, docs/performance.md "Scaling"): a top-K softmax MoE layer of
// width C = 256 with experts of width F = 256, from a base point T = 4096 tokens (32 x 128), E = 32, K = 2,
// varying one of T (1k-16k), E (8-256) and K (1-8) at a time. At each point the layer's training step
// (forward + backward) and the router's route() alone are timed, interleaved, median of `reps`; for each
// sweep a least-squares line through (log x, log ms) gives the growth exponent. Writes nothing; returns
// {"machine", "reps", "base", "sweeps": {"T"|"E"|"K": {"points": [{"x", "layer_ms", "route_ms",
// "assignments"}], "layer_exponent", "route_exponent"}}}. `quick` runs the two smallest points of each sweep
// (tests).
nlohmann::json run_scaling_bench(int reps, bool quick, std::ostream& log);

// The PNG of run_scaling_bench's result (log-log, one panel per sweep), written with gnuplot to
// `png`; its data and script go beside it.
void plot_scaling_bench(const nlohmann::json& result, const std::string& png);

}  // namespace moeforge
