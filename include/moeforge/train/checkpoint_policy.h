// The checkpoint policy of a training run (docs/reliability.md, "Checkpoints"): how a run folder's
// checkpoints are named and how many are kept, what a resumed run may change and what it restores, and how
// metrics.jsonl is cut back to the step a run resumes from.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "moeforge/config/run_config.h"
#include "moeforge/model/checkpoint.h"

namespace moeforge {

// "step-NNNNNN", the folder of the checkpoint of step `step` under a run's checkpoints/.
std::string step_name(int64_t step);
// Keeps the newest `keep` step-NNNNNN folders of `dir`.
void prune_checkpoints(const std::filesystem::path& dir, int64_t keep);

// The checkpoint's configuration with the `overrides` a resumed run may apply (how long it runs and how
// often it logs, evaluates and checkpoints, and dist.expert_parallel); any other key is a ConfigError naming
// it, and a config the checkpoint's writer wrote that this build cannot read names that writer. Validated.
RunConfig resume_config(const Checkpoint& ckpt, const std::string& dir,
                        const std::vector<std::string>& overrides);
// A non-negative integer counter from the checkpoint's trainer metadata, or a FileError naming it.
int64_t trainer_counter(const Checkpoint& ckpt, const std::string& dir, const std::string& key);

// After a resume from step `step`, metrics.jsonl keeps only the rows written up to that step (the run
// that wrote the checkpoint may have gone on before it ended), so that every step and split has one row.
// A torn last line (the writer killed mid-line) is dropped too.
void truncate_metrics(const std::string& path, int64_t step);

// The default CPU generator's state (noise in routers, sampling): saved so a resumed run draws the same.
torch::Tensor rng_state();
void set_rng_state(const torch::Tensor& state);

}  // namespace moeforge
