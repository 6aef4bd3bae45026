// The [model] and [train] sections, and the whole run configuration (model, moe, train, data).
#pragma once

#include <cstdint>
#include <string>

#include "moeforge/config/moe_config.h"

namespace moeforge {

struct ModelConfig {
  int64_t d_model = 128;        // model.d_model: C
  int64_t n_layer = 4;          // model.n_layer
  int64_t n_head = 4;           // model.n_head
  int64_t d_ff = 344;           // model.d_ff: hidden width of the dense SwiGLU FFNs
  int64_t moe_every = 1;        // model.moe_every: layer i has an MoE FFN when (i + 1) % moe_every == 0
  bool tie_embeddings = true;   // model.tie_embeddings: output head = token embedding^T
  bool attn_bias = false;       // model.attn_bias: biases on the q, k, v projections (Qwen2; docs/interop.md)
  double rope_theta = 10000.0;  // model.rope_theta
  double norm_eps = 1e-5;       // model.norm_eps: RMSNorm epsilon
  int64_t vocab_size = 0;       // set from the tokenizer (data.vocab_size), not a config key
  int64_t max_seq_len = 0;      // set from data.seq_len, not a config key
  void validate() const;
  bool is_moe_layer(int64_t i) const { return moe_every > 0 && (i + 1) % moe_every == 0; }
};

struct TrainConfig {
  int64_t steps = 1000;              // train.steps: optimiser steps
  int64_t batch_size = 16;           // train.batch_size: sequences per micro-batch
  int64_t grad_accum = 1;            // train.grad_accum: micro-batches per step
  double lr = 3e-3;                  // train.lr: peak learning rate
  double min_lr_ratio = 0.1;         // train.min_lr_ratio: cosine floor as a share of lr
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
  void validate() const;
};

}  // namespace moeforge
