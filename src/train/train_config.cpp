// The [train] section (train_config.h).
#include "moeforge/train/train_config.h"

#include "moeforge/config/binder.h"
#include "moeforge/util/error.h"

namespace moeforge {

void TrainConfig::validate() const {
  require_config(steps >= 1, "train.steps", "must be >= 1, got " + std::to_string(steps));
  require_config(batch_size >= 1, "train.batch_size", "must be >= 1, got " + std::to_string(batch_size));
  require_config(grad_accum >= 1, "train.grad_accum", "must be >= 1, got " + std::to_string(grad_accum));
  require_config(lr > 0, "train.lr", "must be > 0");
  require_config(min_lr_ratio >= 0 && min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]");
  require_config(warmup >= 0, "train.warmup", "must be >= 0");
  require_config(schedule == "cosine" || schedule == "constant" || schedule == "wsd", "train.schedule",
                 "must be \"cosine\", \"constant\" or \"wsd\", got \"" + schedule + "\"");
  require_config(decay_fraction > 0 && decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]");
  require_config(weight_decay >= 0, "train.weight_decay", "must be >= 0");
  require_config(beta1 >= 0 && beta1 < 1, "train.beta1", "must be in [0, 1)");
  require_config(beta2 >= 0 && beta2 < 1, "train.beta2", "must be in [0, 1)");
  require_config(adam_eps > 0, "train.adam_eps", "must be > 0");
  require_config(grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)");
  require_config(eval_every >= 0, "train.eval_every", "must be >= 0");
  require_config(eval_batches >= 0, "train.eval_batches", "must be >= 0");
  require_config(log_every >= 1, "train.log_every", "must be >= 1");
  require_config(checkpoint_every >= -1, "train.checkpoint_every",
                 "must be >= -1 (-1 = at every evaluation, 0 = only at the end)");
  require_config(keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1");
  require_config(nan_policy == "stop" || nan_policy == "skip", "train.nan_policy",
                 "must be \"stop\" or \"skip\", got \"" + nan_policy + "\"");
  require_config(threads >= 0, "train.threads", "must be >= 0");
  require_config(precision == "fp32" || precision == "bf16", "train.precision",
                 "must be \"fp32\" or \"bf16\", got \"" + precision + "\"");
}

void bind_train_config(ConfigBinder& b, TrainConfig* c) {
  b.bind("train.steps", &c->steps);
  b.bind("train.batch_size", &c->batch_size);
  b.bind("train.grad_accum", &c->grad_accum);
  b.bind("train.lr", &c->lr);
  b.bind("train.min_lr_ratio", &c->min_lr_ratio);
  b.bind("train.schedule", &c->schedule);
  b.bind("train.decay_fraction", &c->decay_fraction);
  b.bind("train.warmup", &c->warmup);
  b.bind("train.weight_decay", &c->weight_decay);
  b.bind("train.beta1", &c->beta1);
  b.bind("train.beta2", &c->beta2);
  b.bind("train.adam_eps", &c->adam_eps);
  b.bind("train.grad_clip", &c->grad_clip);
  b.bind("train.eval_every", &c->eval_every);
  b.bind("train.eval_batches", &c->eval_batches);
  b.bind("train.log_every", &c->log_every);
  b.bind("train.checkpoint_every", &c->checkpoint_every);
  b.bind("train.keep_checkpoints", &c->keep_checkpoints);
  b.bind("train.seed", &c->seed);
  b.bind("train.nan_policy", &c->nan_policy);
  b.bind("train.threads", &c->threads);
  b.bind("train.precision", &c->precision);
}

}  // namespace moeforge
