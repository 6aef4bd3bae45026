// The [train] section: the optimiser, its schedule, the cadences of logging, evaluation and checkpoints
// (docs/architecture.md, "Config sections": a section header includes nothing of moeforge).
#pragma once

#include <cstdint>
#include <string>

namespace moeforge {

struct TrainConfig {
  int64_t steps = 1000;       // train.steps: optimiser steps
  int64_t batch_size = 16;    // train.batch_size: sequences per micro-batch
  int64_t grad_accum = 1;     // train.grad_accum: micro-batches per step
  double lr = 3e-3;           // train.lr: peak learning rate
  double min_lr_ratio = 0.1;  // train.min_lr_ratio: the schedule's floor as a share of lr
  // train.schedule, after the warm-up: "cosine" (decay to the floor at train.steps), "constant" (lr to the
  // end) or "wsd" (warmup-stable-decay: lr until the last train.decay_fraction of the steps, then linear to
  // the floor), whose curves are not bent by the schedule until the decay (docs/comparison.md).
  std::string schedule = "cosine";
  double decay_fraction = 0.2;       // train.decay_fraction: wsd's share of the steps spent decaying
  int64_t warmup = 50;               // train.warmup: linear warm-up steps
  double weight_decay = 0.1;         // train.weight_decay: AdamW decoupled decay on matrices
  double beta1 = 0.9, beta2 = 0.95;  // train.beta1, train.beta2
  double adam_eps = 1e-8;            // train.adam_eps
  double grad_clip = 1.0;            // train.grad_clip: max global gradient norm (0 = off)
  int64_t eval_every = 100;          // train.eval_every: steps between evaluations (0 = only at the end)
  int64_t eval_batches = 8;          // train.eval_batches: batches per evaluation split (0 = the whole split)
  int64_t log_every = 10;            // train.log_every: steps between train metric lines
  int64_t checkpoint_every = -1;    // train.checkpoint_every: steps between checkpoints (0 = only at the end,
                                    // -1 = at every evaluation, train.eval_every; docs/reliability.md)
  int64_t keep_checkpoints = 2;     // train.keep_checkpoints: how many step checkpoints to keep
  int64_t seed = 1;                 // train.seed
  std::string nan_policy = "stop";  // train.nan_policy: "stop" or "skip" a step with a non-finite loss
  int64_t threads = 0;              // train.threads: LibTorch threads (0 = the cores available)
  std::string precision = "fp32";   // train.precision: "fp32", or "bf16" matrix products with float32
                                    // master weights, optimiser and reductions (docs/performance.md)
  void validate() const;
};

class ConfigBinder;
// Registers every [train] key of `cfg` under "train.<key>".
void bind_train_config(ConfigBinder& binder, TrainConfig* cfg);

}  // namespace moeforge
