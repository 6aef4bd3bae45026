// moeforge: the command line. One file per subcommand (command.h); each has --help.
#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <iostream>

#include "command.h"
#include "moeforge/dist/dist.h"
#include "moeforge/util/runtime.h"

namespace moeforge::cli {

std::string error_message(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e))
    return "out of memory (an allocation failed); a smaller model, batch or input needs less";
  const auto* c10 = dynamic_cast<const c10::Error*>(&e);
  std::string what = c10 ? c10->what_without_backtrace() : e.what();
  if (c10 && what.find("allocate") != std::string::npos)
    return "out of memory: " + what.substr(0, what.find('\n')) +
           " (the model, batch or input is larger than this machine's memory)";
  return what;
}

}  // namespace moeforge::cli

int main(int argc, char** argv) {
  using namespace moeforge;
  moeforge::ensure_thread_wait_policies(argv);
  CLI::App app{"moeforge: Mixture-of-Experts routing, training and measurement in C++"};
  app.require_subcommand(1);
  cli::Globals g;
  g.argv0 = argv[0];
  for (int i = 1; i < argc; ++i) g.arguments += std::string(" ") + argv[i];
  app.add_option("--threads", g.threads, "LibTorch threads (default: the cores available)")
      ->check(CLI::NonNegativeNumber);
  const std::vector<cli::Command> commands = {
      cli::add_train(app, g),      cli::add_upcycle(app, g), cli::add_eval(app, g),
      cli::add_generate(app, g),   cli::add_inspect(app, g), cli::add_prune(app, g),
      cli::add_bench(app, g),      cli::add_info(app, g),    cli::add_compare(app, g),
      cli::add_export(app, g),     cli::add_import(app, g),  cli::add_tokenize(app, g),
      cli::add_trace_view(app, g), cli::add_serve(app, g)};
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    init_threads(g.threads);
    for (const auto& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (const std::exception& e) {
    std::cerr << "moeforge: error: " << cli::error_message(e) << "\n";
    if (dist::active()) {
      // A rank of a failed group leaves at once: c10d's threads may still wait on a peer that is gone, and
      // the exit must come within the bound docs/distributed.md states. Checkpoints are atomic.
      std::cout.flush();
      std::cerr.flush();
      std::_Exit(1);
    }
    return 1;
  }
  return 0;
}
