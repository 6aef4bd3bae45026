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
#include "moeforge/data/data.h"
#include "moeforge/data/instruct.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/transformer.h"
#include "moeforge/train/evaluate.h"

namespace moeforge {

struct TrainOptions {
  std::string out_dir = "runs/default";  // metrics.jsonl, checkpoints/, report.md go here
  std::string resume;                    // a checkpoint folder, or a run's checkpoints/ folder
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

// Everything derived from [data]: the split, the tokenizer (trained, cached, or from a checkpoint) and the
// packed splits.
struct DataBundle {
  CorpusSplit split;
  std::optional<InstructData> instruct;  // data.corpus = "instruct": the samples the splits were packed from
  std::optional<Tokenizer> tokenizer;
  PackedData train, validation, heldout;
};
DataBundle prepare_data(const DataConfig& cfg, const std::string* tokenizer_model, std::ostream& log);

// A trained model restored from a checkpoint (for eval, generate, inspect, prune, upcycle).
struct LoadedModel {
  RunConfig cfg;
  std::optional<Tokenizer> tokenizer;
  TransformerLM model{nullptr};
  int64_t step = 0;
  std::string dir;
};
LoadedModel load_model(const std::string& checkpoint_dir);

// Builds the model of `cfg` for a vocabulary of `vocab_size` tokens.
TransformerLM build_model(RunConfig& cfg, int64_t vocab_size);

// Before a checkpoint's model is built from its config.toml: a lower bound of the parameters that config
// describes must be held by the checkpoint's model file (whose size the safetensors reader has already
// bounded by the file's), so that a hostile config cannot make the constructor allocate more than the file
// holds. Throws FileError naming `where` (docs/reliability.md, "Checkpoints").
void check_config_fits_model_file(const RunConfig& cfg, int64_t vocab_size, const NamedTensors& model,
                                  const std::string& where);

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

TrainSummary train_model(RunConfig cfg, const TrainOptions& opt, std::ostream& log);

}  // namespace moeforge
