// AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on matrices only, and the warm-up + cosine
// learning-rate schedule. Written here rather than taken from torch::optim so that its state is plain named
// tensors (saved in safetensors checkpoints) and a resumed run continues bit for bit.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "moeforge/train/train_config.h"

namespace moeforge {

class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, torch::Tensor>> params, const TrainConfig& cfg);

  // One update with learning rate `lr` from the current .grad() of every parameter (missing grads skip).
  void step(double lr);
  void zero_grad();
  int64_t steps_taken() const { return t_; }

  // "adam.m.<name>", "adam.v.<name>", "adam.t": everything needed to continue exactly.
  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  // Restores state(); throws naming the entry that is missing or has the wrong shape.
  void load_state(const std::vector<std::pair<std::string, torch::Tensor>>& state, const std::string& where);

 private:
  std::vector<std::pair<std::string, torch::Tensor>> params_;
  std::vector<torch::Tensor> m_, v_;
  TrainConfig cfg_;
  int64_t t_ = 0;
};

// Linear warm-up to cfg.lr over cfg.warmup steps, then cfg.schedule: cosine decay to cfg.lr *
// cfg.min_lr_ratio at cfg.steps, constant, or warmup-stable-decay (linear to the floor over the last
// cfg.decay_fraction of the steps, reached at the last step).
double learning_rate(const TrainConfig& cfg, int64_t step);

// Scales all gradients so that their global L2 norm is at most max_norm; returns the norm before clipping.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace moeforge
