// The cost of running past one process (docs/distributed.md, "Measured"): the same training steps at
// 1 rank x T threads and at 2 ranks x T/2 threads (the fair comparison on one host: the same cores), data
// parallel with the gradient all-reduce overlapped with backward and without, and with the experts
// sharded (dist.expert_parallel = 2), for the default model and a wider one. Each run is a real
// `moeforge train` launched the way a user launches it (this binary, RANK / WORLD_SIZE / MASTER_ADDR /
// MASTER_PORT), its figures read back from metrics.jsonl and rank 0's dist.json; the runs are
// interleaved over rounds, so that a machine's drift reaches every setting alike.
#pragma once

#include <nlohmann/json.hpp>

#include <ostream>
#include <string>
#include <vector>

namespace moeforge {

struct DistBenchOptions {
  int steps = 30;                      // training steps per run (the throughput is the whole run's)
  int rounds = 2;                      // each setting runs once per round
  int threads = 2;                     // cores to use: 1 rank x threads, 2 ranks x threads/2
  std::vector<std::string> overrides;  // "section.key=value" for every run (e.g. data.dir)
  std::string plot;                    // PNG of tokens/s per setting; empty: none
  bool quick = false;                  // the default model only
};

// Returns {"machine", "steps", "rounds", "models": {name: {"overrides", "tokens_per_step", "settings":
// {name: {"tokens_per_s": [per round], "median_tokens_per_s", "ratio_to_one_rank", "step_ms", and from
// rank 0's dist.json the bytes, all-to-all and all-reduce figures}}}}}; prints a table to `log`.
nlohmann::json run_dist_bench(const DistBenchOptions& opt, std::ostream& log);

}  // namespace moeforge
