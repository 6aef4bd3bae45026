// A progress bar for long work: done/total, a bar, free-form fields (loss, tokens/s) and the ETA. On a
// terminal it redraws one line; otherwise (logs, CI) it prints a line at every 10% so logs stay short.
#pragma once

#include <chrono>
#include <cstdint>
#include <ostream>
#include <string>

namespace moeforge {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, std::ostream& out, bool enabled = true);
  // `done` units finished (absolute); `fields` is shown after the bar, e.g. "loss 3.21 | 5.1k tok/s".
  void update(int64_t done, const std::string& fields = "");
  // The last line, at the total.
  void finish(const std::string& fields = "");
  // The last line of work that ended at `done` units: the total when it is complete, else the line says it
  // stopped there (no ETA: nothing is coming).
  void finish_at(int64_t done, const std::string& fields = "");

 private:
  void draw(int64_t done, const std::string& fields, const std::string& tail);
  std::string label_;
  int64_t total_, start_done_ = -1, last_decile_ = -1;
  std::ostream& out_;
  bool enabled_, tty_;
  std::chrono::steady_clock::time_point start_;
};

// "1h02m", "3m05s", "12s"
std::string format_duration(double seconds);

}  // namespace moeforge
