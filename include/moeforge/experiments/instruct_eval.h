// Task evaluation on instruction data (data.corpus = "instruct", docs/instruct-data.md): per-task exact
// match of greedy generations, response-token perplexity, held-in and held-out averages, and which
// clusters and experts each task's tokens went to.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "moeforge/data/instruct.h"
#include "moeforge/data/tokenizer.h"
#include "moeforge/model/transformer.h"

namespace moeforge {

// The form answers are compared in: lower case, every run of white space one space, no white space or
// final . , ; : ! ? at either end (the tasks' answers are words, numbers and word lists;
// docs/instruct-data.md).
std::string normalize_answer(const std::string& text);

// Whether `generated` equals one of `answers` after normalize_answer.
bool answer_matches(const std::string& generated, const std::vector<std::string>& answers);

struct InstructEvalOptions {
  int64_t max_new_tokens = 32;  // greedy generation stops at </s> or after this many tokens
  int64_t per_task = 0;         // samples scored per task, the split's first ones (0 = all)
  int64_t batch_size = 16;      // for the teacher-forced pass (perplexity and routing tables)
  int64_t examples = 3;         // generations kept per task for the report
  // Log-likelihood multiple choice (docs/instruct.md, "Multiple choice"): each sample's reference against
  // up to mc_choices - 1 distractors, the other answers of its task's samples; 0 = not scored.
  int64_t mc_choices = 4;
};

// The candidates of a sample's multiple choice: its reference and up to choices - 1 distractors drawn from
// `pool` (the distinct answers of its task, in a fixed order) that match none of its accepted answers
// (normalize_answer), taken from a starting point set by `salt` so that samples get different ones; the
// reference at position salt % size. Returns the candidates and sets *reference to the reference's index.
std::vector<std::string> mc_candidates(const InstructSample& x, const std::vector<std::string>& pool,
                                       int64_t choices, uint64_t salt, int64_t* reference);

struct InstructTaskScore {
  std::string task, family;
  bool heldout = false;
  int64_t samples = 0, exact = 0;
  double loss_sum = 0;  // response-token cross-entropy (nats), summed
  int64_t tokens = 0;   // response tokens scored (the answer and its </s>)
  int64_t too_long =
      0;  // samples longer than the context: in no perplexity, answered "" if the prompt fills it
  // Multiple choice: samples scored (those whose candidates all fit the context and that have at least one
  // distractor), those whose reference had the highest summed log-likelihood, and the sum of 1 / candidates
  // (the chance level's numerator).
  int64_t mc_samples = 0, mc_correct = 0;
  double mc_chance_sum = 0;
  // Per sample scored (the task's evaluated samples, in order; too-long ones are absent): its index and its
  // mean response-token loss (nats), so that two models can be compared sample by sample.
  std::vector<std::pair<int64_t, double>> sample_loss;
  std::vector<int64_t> cluster;  // [G] the first MoE layer's cluster of each scored position (MoCE)
  std::vector<int64_t> expert;   // [E] the first MoE layer's assignments of each scored position
  struct Example {
    std::string prompt, generated, reference;
    bool correct = false;
  };
  std::vector<Example> examples;
  double accuracy() const { return samples > 0 ? double(exact) / double(samples) : 0.0; }
  double mc_accuracy() const { return mc_samples > 0 ? double(mc_correct) / double(mc_samples) : 0.0; }
  double mc_chance() const { return mc_samples > 0 ? mc_chance_sum / double(mc_samples) : 0.0; }
  double loss() const { return tokens > 0 ? loss_sum / double(tokens) : 0.0; }
};

struct InstructEvalResult {
  std::vector<InstructTaskScore> tasks;  // the data's task order
  // Macro averages over tasks (each task counts once, as in the paper's task averages).
  double heldin_accuracy = 0, heldout_accuracy = 0;
  double heldin_loss = 0, heldout_loss = 0;  // mean of the tasks' response-token losses
  // Multiple-choice accuracy and its chance level, task averages (tasks with scored samples only).
  double heldin_mc = 0, heldout_mc = 0, heldin_mc_chance = 0, heldout_mc_chance = 0;
  // Cluster purity by task and by task family, from the tasks' cluster counts (0 without clusters).
  double cluster_purity_task = 0, cluster_purity_family = 0;
  nlohmann::json to_json() const;
};

// Scores `samples` (a split of `data`: normally data.test, which holds the held-out tasks' samples).
// Generation uses the model's own routing, the same rule as `moeforge generate` (MoCE: the cluster of the
// prompt's pool); the teacher-forced pass gives the response perplexity and the routing tables.
InstructEvalResult evaluate_instruct(TransformerLM& model, const Tokenizer& tok, const InstructData& data,
                                     const std::vector<InstructSample>& samples,
                                     const InstructEvalOptions& opt);

// The result as text: a table of tasks (held-out ones marked), the averages, and for routers with clusters
// the task x cluster table.
std::string format_instruct_eval(const InstructEvalResult& r);

}  // namespace moeforge
