#include "moeforge/config/model_config.h"

#include "moeforge/util/error.h"

namespace moeforge {

namespace {
void require(bool ok, const char* field, const std::string& message) {
  if (!ok) throw ConfigError(field, message);
}
}  // namespace

void ModelConfig::validate() const {
  require(d_model >= 2, "model.d_model", "must be >= 2, got " + std::to_string(d_model));
  require(n_head >= 1, "model.n_head", "must be >= 1, got " + std::to_string(n_head));
  require(d_model % n_head == 0, "model.n_head",
          "model.d_model = " + std::to_string(d_model) +
              " is not divisible by n_head = " + std::to_string(n_head));
  require((d_model / n_head) % 2 == 0, "model.n_head",
          "the head width d_model / n_head must be even (rotary pairs)");
  require(n_layer >= 1, "model.n_layer", "must be >= 1, got " + std::to_string(n_layer));
  require(d_ff >= 1, "model.d_ff", "must be >= 1, got " + std::to_string(d_ff));
  require(moe_every >= 0, "model.moe_every",
          "must be >= 0 (0 = no MoE layers), got " + std::to_string(moe_every));
  require(rope_theta > 0, "model.rope_theta", "must be > 0");
  require(norm_eps > 0, "model.norm_eps", "must be > 0");
  require(vocab_size >= 2, "data.vocab_size", "the model needs a vocabulary of at least 2 tokens");
  require(max_seq_len >= 1, "data.seq_len", "must be >= 1");
}

void TrainConfig::validate() const {
  require(steps >= 1, "train.steps", "must be >= 1, got " + std::to_string(steps));
  require(batch_size >= 1, "train.batch_size", "must be >= 1, got " + std::to_string(batch_size));
  require(grad_accum >= 1, "train.grad_accum", "must be >= 1, got " + std::to_string(grad_accum));
  require(lr > 0, "train.lr", "must be > 0");
  require(min_lr_ratio >= 0 && min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]");
  require(warmup >= 0, "train.warmup", "must be >= 0");
  require(weight_decay >= 0, "train.weight_decay", "must be >= 0");
  require(beta1 >= 0 && beta1 < 1, "train.beta1", "must be in [0, 1)");
  require(beta2 >= 0 && beta2 < 1, "train.beta2", "must be in [0, 1)");
  require(adam_eps > 0, "train.adam_eps", "must be > 0");
  require(grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)");
  require(eval_every >= 0, "train.eval_every", "must be >= 0");
  require(eval_batches >= 0, "train.eval_batches", "must be >= 0");
  require(log_every >= 1, "train.log_every", "must be >= 1");
  require(checkpoint_every >= -1, "train.checkpoint_every",
          "must be >= -1 (-1 = at every evaluation, 0 = only at the end)");
  require(keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1");
  require(nan_policy == "stop" || nan_policy == "skip", "train.nan_policy",
          "must be \"stop\" or \"skip\", got \"" + nan_policy + "\"");
  require(threads >= 0, "train.threads", "must be >= 0");
}

}  // namespace moeforge
