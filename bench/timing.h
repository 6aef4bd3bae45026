// Timing helpers of the benches: median of repetitions, and variants interleaved in one run
// (docs/performance.md ("Definitions", method): ratios measured in one process, A B A B ...).
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moeforge::bench {

struct Timing {
  std::vector<double> ms;
  double median() const {
    auto v = ms;
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  }
  double min() const { return *std::min_element(ms.begin(), ms.end()); }
  double max() const { return *std::max_element(ms.begin(), ms.end()); }
};

inline double time_ms(const std::function<void()>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::milli>(t1 - t0).count();
}

using Variants = std::vector<std::pair<std::string, std::function<void()>>>;

// Runs every variant `warmup` times, then reps rounds of A B C ... interleaved. Each round starts one
// variant later (A B C, B C A, C A B, ...), so that no variant always runs right after the same one: a
// variant that leaves the allocator and caches in a bad state (the plain loop frees ~400 MiB and trims
// the heap) would otherwise always slow down the one after it.
inline std::map<std::string, Timing> interleaved(const Variants& variants, int reps, int warmup = 1) {
  std::map<std::string, Timing> out;
  for (int w = 0; w < warmup; ++w)
    for (auto& v : variants) v.second();
  const size_t n = variants.size();
  for (int r = 0; r < reps; ++r)
    for (size_t i = 0; i < n; ++i) {
      const auto& v = variants[(i + static_cast<size_t>(r)) % n];
      out[v.first].ms.push_back(time_ms(v.second));
    }
  return out;
}

}  // namespace moeforge::bench
