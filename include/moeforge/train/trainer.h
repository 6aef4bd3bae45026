// Training a MoE language model end to end: data, model, AdamW with warm-up + cosine, gradient clipping
// and accumulation, evaluation, metrics as JSONL, a NaN/Inf guard, router after_step hooks, atomic
// checkpoints and exact resume.
#pragma once

#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "moeforge/config/run_config.h"
#include "moeforge/data/batching.h"
#include "moeforge/layer/precision.h"
#include "moeforge/model/transformer.h"
#include "moeforge/train/evaluate.h"
#include "moeforge/util/runtime.h"

namespace moeforge {

struct TrainOptions {
  std::string out_dir = "runs/default";  // metrics.jsonl, checkpoints/, report.md go here
  // A fresh run into a folder that holds an earlier run replaces it (else that is an error; run_folder.h).
  bool overwrite = false;
  std::string resume;      // a checkpoint folder, or a run's checkpoints/ folder
  std::string init_from;   // start from this checkpoint's weights and tokenizer (fresh optimiser,
                           // step 0): fine-tuning an upcycled checkpoint
  int64_t stop_after = 0;  // stop (with a checkpoint) once this many steps are done; 0 = train.steps
  // With `resume`: --set overrides of the checkpoint's config; only the keys that say how long and how often
  // (train.steps, eval/log/checkpoint cadence) are allowed, others are a ConfigError naming the key.
  std::vector<std::string> resume_overrides;
  // Poll stop_signal() (util/interrupt.h) after every step: on SIGINT / SIGTERM, checkpoint that step and
  // return with TrainSummary::interrupted_by set.
  bool stop_on_signal = false;
  bool progress = true;
  std::string progress_label = "train";  // the progress bar's label (compare names the router there)
  // Called before every step with the index of the step about to run (0-based, also the first step after a
  // resume) and the model: moeforge compare injects its faults here.
  std::function<void(int64_t step, TransformerLM& model)> before_step;
  // Extra fields for the progress bar, asked after every step (compare: the whole comparison's ETA).
  std::function<std::string(int64_t step)> progress_extra;
};

struct TrainSummary {
  int64_t step = 0;                  // steps done in total
  int64_t planned_steps = 0;         // train.steps of the run (more than `step` when it stopped early)
  std::vector<double> step_losses;   // training loss (cross-entropy) of every step this run did
  std::vector<double> step_max_vio;  // MaxVio_batch of every step this run did, averaged over MoE layers
  // The first training batch this run drew: its token count and an FNV-1a digest of its token ids, so that
  // runs that should see the same data (moeforge compare) can show that they did.
  int64_t first_batch_tokens = 0;
  uint64_t first_batch_digest = 0;
  int64_t skipped_steps = 0;  // non-finite steps skipped (train.nan_policy = "skip")
  std::optional<EvalResult> validation, heldout;
  std::string checkpoint;  // the checkpoint written last
  int interrupted_by = 0;  // the signal that stopped the run (stop_on_signal), else 0
  double tokens_per_s = 0;
  double seconds = 0;
};

// The training forward pass of one batch ([B, S + 1] tokens, next-token targets): the per-token
// cross-entropy [B*S], the batch's loss weights [B*S] (undefined when the batch has none: weight 1
// everywhere) and the model's output (aux loss, routing plans). train_model and `moeforge bench --train`
// run their steps through it.
struct BatchLoss {
  torch::Tensor token_ce;
  torch::Tensor weight;
  LMOutput out;
  // The training loss: sum(w * ce) / sum(w), on the response tokens of instruction data; without weights
  // exactly token_ce.mean(), as before weights existed (the golden training test holds it to PyTorch).
  torch::Tensor loss() const;
};
BatchLoss training_forward(TransformerLM& model, const Batcher::Batch& batch);

// train.precision checked against the CPU that runs it: "fp32", or "bf16" where the CPU has native bf16
// products (AVX512-BF16 or AMX-BF16, bf16_support); elsewhere "bf16" is a ConfigError naming
// train.precision, never a silent emulation at a fraction of float32's rate (docs/performance.md, "bf16
// training"). `what_runs`, when given, is set to a line saying what runs.
MatmulPrecision run_precision(const TrainConfig& tc, const CpuFeatures& cpu,
                              std::string* what_runs = nullptr);

// Trains the model of `cfg` (a validated config: load_run_config*, or RunConfig::validate) as `opt` says,
// logging to `log`: the phases are src/train/trainer.cpp's Trainer (docs/architecture.md, "One training
// step"). With opt.resume the checkpoint's own config is used instead, with opt.resume_overrides.
TrainSummary train_model(RunConfig cfg, const TrainOptions& opt, std::ostream& log);

}  // namespace moeforge
