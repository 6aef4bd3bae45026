// Loading and building a model: from a run config, or from a checkpoint folder with its config.toml,
// tokenizer and weights (eval, generate, inspect, prune, upcycle, export and training's report all start
// here).
#pragma once

#include <optional>
#include <string>

#include "moeforge/config/run_config.h"
#include "moeforge/data/tokenizer.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/transformer.h"

namespace moeforge {

// A trained model restored from a checkpoint.
struct LoadedModel {
  RunConfig cfg;
  std::optional<Tokenizer> tokenizer;
  TransformerLM model{nullptr};
  int64_t step = 0;
  std::string dir;
};
// The checkpoint at `checkpoint_dir` (a checkpoint folder, or a run's checkpoints/ folder), in eval mode.
LoadedModel load_model(const std::string& checkpoint_dir);

// Builds the model of `cfg` (a validated config) for a vocabulary of `vocab_size` tokens; sets
// cfg.model.vocab_size and cfg.model.max_seq_len (= data.seq_len).
TransformerLM build_model(RunConfig& cfg, int64_t vocab_size);

// Before a checkpoint's model is built from its config.toml: a lower bound of the parameters that config
// describes must be held by the checkpoint's model file (whose size the safetensors reader has already
// bounded by the file's), so that a hostile config cannot make the constructor allocate more than the file
// holds. Throws FileError naming `where` (docs/reliability.md, "Checkpoints").
void check_config_fits_model_file(const RunConfig& cfg, int64_t vocab_size, const NamedTensors& model,
                                  const std::string& where);

}  // namespace moeforge
