// The run report: report.md with PNG plots rendered by gnuplot from metrics.jsonl and the final
// evaluation: loss curves, per-layer expert load over time, expert x domain heatmap.
#pragma once

#include <string>
#include <vector>

#include "moeforge/data/batching.h"
#include "moeforge/train/evaluate.h"

namespace moeforge {

struct ReportInputs {
  std::string run_dir;  // holds metrics.jsonl; report.md and plots/ are written here
  std::string title;
  std::vector<std::pair<std::string, std::string>> facts;  // (name, value) rows for the summary table
  const EvalResult* validation = nullptr;                  // final evaluation (heatmap)
  std::string sample;                                      // a generated text sample
};

// Writes report.md and plots/*.png; returns the path of report.md. Throws if gnuplot fails.
std::string write_report(const ReportInputs& in);

// Perplexity of a unigram model (add-one smoothed token frequencies of `train`) on `eval`: the baseline a
// language model must beat. Targets are the rows' tokens [:, 1:].
double unigram_perplexity(const PackedData& train, const PackedData& eval, int64_t vocab_size);

}  // namespace moeforge
