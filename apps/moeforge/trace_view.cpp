// moeforge trace-view: a routing trace (generate --trace, eval --trace) as one self-contained HTML page,
// and optionally as a PNG of it (docs/serve.md, "The page").
#include <filesystem>
#include <iostream>

#include "command.h"
#include "moeforge/experiments/trace_page.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/browser.h"
#include "moeforge/util/error.h"

namespace moeforge::cli {

namespace {

struct TraceViewArgs {
  std::string trace, out, png;
  int64_t max_tokens = 50000;
  int width = 1280, height = 1024;
};

int run_trace_view(const TraceViewArgs& a) {
  const auto t = read_routing_trace(a.trace, a.max_tokens);
  const std::string title = "moeforge routing trace: " + std::filesystem::path(a.trace).filename().string();
  write_file_atomic(a.out, routing_trace_page(t, title));
  std::cout << "page of " << t.records.size() << " tokens: " << a.out << "\n";
  if (t.left_out > 0)
    std::cout << t.left_out << " more tokens of the trace are not on the page (--max-tokens " << a.max_tokens
              << ")\n";
  if (!a.png.empty()) {
    screenshot_page(a.out, a.png, a.width, a.height);
    std::cout << "screenshot (" << a.width << " x " << a.height << "): " << a.png << "\n";
  }
  return 0;
}

}  // namespace

Command add_trace_view(CLI::App& app, const Globals& /*g*/) {
  auto a = std::make_shared<TraceViewArgs>();
  auto* c = app.add_subcommand("trace-view", "draw a routing trace (generate/eval --trace) as an HTML page");
  c->add_option("trace", a->trace, "the trace file (JSON lines)")->required();
  c->add_option("--out", a->out, "the HTML page to write")->required();
  c->add_option("--png", a->png, "also a screenshot of the page as PNG (headless chromium)");
  c->add_option("--max-tokens", a->max_tokens, "tokens drawn at most (the rest are counted)")
      ->check(CLI::Range(int64_t(1), int64_t(10000000)));
  c->add_option("--width", a->width, "screenshot width in pixels")->check(CLI::Range(16, 8192));
  c->add_option("--height", a->height, "screenshot height in pixels")->check(CLI::Range(16, 16384));
  return {c, [a] { return run_trace_view(*a); }};
}

}  // namespace moeforge::cli
