// moeforge: the command line. Each subcommand has --help.
#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <iostream>

#include "../../bench/layer_bench.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/runtime.h"

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

}  // namespace

int main(int argc, char** argv) {
  moeforge::ensure_openmp_wait_policy(argv);
  CLI::App app{"moeforge: Mixture-of-Experts routing, training and measurement in C++"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "LibTorch threads (default: the cores available)")
      ->check(CLI::NonNegativeNumber);

  auto* bench =
      app.add_subcommand("bench", "MoE layer vs dense-equivalent FFN vs plain expert loop (BENCHMARKS.md)");
  std::string json_path, shapes_csv;
  moeforge::LayerBenchOptions bench_opt;
  bench->add_option("--json", json_path, "write the results as JSON to this file");
  bench->add_option("--reps", bench_opt.reps, "timed repetitions per variant")->check(CLI::Range(1, 1000));
  std::string shape_names;
  for (auto& s : moeforge::default_bench_shapes()) shape_names += (shape_names.empty() ? "" : ",") + s.name;
  bench->add_option("--shapes", shapes_csv, "comma-separated subset of: " + shape_names);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    moeforge::init_threads(threads);
    if (bench->parsed()) {
      bench_opt.shapes = split_csv(shapes_csv);
      for (auto& s : bench_opt.shapes) {
        bool ok = false;
        for (auto& d : moeforge::default_bench_shapes()) ok = ok || d.name == s;
        if (!ok)
          throw moeforge::ConfigError("--shapes", "unknown shape '" + s + "' (expected " + shape_names + ")");
      }
      std::cout << "moeforge bench: " << moeforge::describe_machine() << "\n";
      auto result = moeforge::run_layer_bench(bench_opt, std::cout);
      if (!json_path.empty()) {
        moeforge::write_file_atomic(json_path, result.dump(2) + "\n");
        std::cout << "wrote " << json_path << "\n";
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "moeforge: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
