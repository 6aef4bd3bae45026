#include "moeforge/util/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

namespace moeforge {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(std::llround(s));
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", long(t / 3600), long((t % 3600) / 60));
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", long(t / 60), long(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%lds", long(t));
  return buf;
}

ProgressBar::ProgressBar(std::string label, int64_t total, std::ostream& out, bool enabled)
    : label_(std::move(label)), total_(std::max<int64_t>(1, total)), out_(out), enabled_(enabled) {
  tty_ = (&out == &std::cerr && ::isatty(2)) || (&out == &std::cout && ::isatty(1));
  start_ = std::chrono::steady_clock::now();
}

void ProgressBar::update(int64_t done, const std::string& fields) {
  if (!enabled_) return;
  if (start_done_ < 0) {
    start_done_ = done;
    start_ = std::chrono::steady_clock::now();
  }
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = done > start_done_ ? double(done - start_done_) / elapsed : 0.0;
  const double eta = rate > 0 ? double(total_ - done) / rate : NAN;
  const double frac = double(done) / double(total_);
  const int decile = static_cast<int>(frac * 10);
  if (!tty_ && decile == last_decile_ && done != total_) return;
  last_decile_ = decile;
  draw(done, fields, format_duration(elapsed) + " elapsed, ETA " + format_duration(eta));
}

void ProgressBar::draw(int64_t done, const std::string& fields, const std::string& tail) {
  const double frac = std::min(1.0, std::max(0.0, double(done) / double(total_)));
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(frac * kWidth);
  std::ostringstream os;
  os << label_ << " [" << std::string(filled, '#') << std::string(kWidth - filled, '.') << "] " << done << "/"
     << total_;
  if (!fields.empty()) os << " | " << fields;
  os << " | " << tail;
  if (tty_)
    out_ << "\r" << os.str() << "\x1b[K" << std::flush;
  else
    out_ << os.str() << "\n" << std::flush;
}

void ProgressBar::finish(const std::string& fields) {
  finish_at(total_, fields);
}

void ProgressBar::finish_at(int64_t done, const std::string& fields) {
  if (!enabled_) return;
  last_decile_ = -1;
  if (done >= total_) {
    update(total_, fields);
  } else {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    draw(done, fields,
         format_duration(elapsed) + " elapsed, stopped at " + std::to_string(done) + " of " +
             std::to_string(total_));
  }
  if (tty_) out_ << "\n";
}

}  // namespace moeforge
