// The moeforge command line: one file per subcommand (docs/architecture.md, "apps/"). Each add_<name>()
// registers its subcommand and its options on the app, and returns what runs it once the command line is
// parsed; main.cpp picks the parsed one and turns any exception into "moeforge: error: ..." and exit 1.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace moeforge::cli {

// What every subcommand may read: the global options and the command line itself.
struct Globals {
  int threads = 0;        // --threads (0: the cores available)
  std::string argv0;      // the program as invoked, for the commands a message suggests
  std::string arguments;  // the whole command line after argv0, space-separated (compare records it)
};

// A registered subcommand: its CLI11 app (parsed() says whether it was picked) and its body, which returns
// the process's exit code.
struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;
};

// What "moeforge: error: " is followed by: the exception's message, without the C++ stack trace LibTorch
// appends to its own, and an allocation that failed named as such (docs/reliability.md).
std::string error_message(const std::exception& e);

Command add_train(CLI::App& app, const Globals& g);
Command add_upcycle(CLI::App& app, const Globals& g);
Command add_eval(CLI::App& app, const Globals& g);
Command add_generate(CLI::App& app, const Globals& g);
Command add_inspect(CLI::App& app, const Globals& g);
Command add_prune(CLI::App& app, const Globals& g);
Command add_bench(CLI::App& app, const Globals& g);
Command add_info(CLI::App& app, const Globals& g);
Command add_compare(CLI::App& app, const Globals& g);
Command add_export(CLI::App& app, const Globals& g);
Command add_import(CLI::App& app, const Globals& g);
Command add_tokenize(CLI::App& app, const Globals& g);
Command add_trace_view(CLI::App& app, const Globals& g);
Command add_serve(CLI::App& app, const Globals& g);

}  // namespace moeforge::cli
