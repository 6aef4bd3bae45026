// Data parallelism's synchronisation points (docs/distributed.md): what every rank must agree on after
// each step, built on the collectives of dist.h. All of them are no-ops in a single process.
#pragma once

#include <torch/torch.h>

#include <set>
#include <string>
#include <vector>

#include "moeforge/dist/dist.h"

namespace moeforge::dist {

// Averages the gradients of `params` over ranks (data parallelism's gradient all-reduce), in buckets of
// at most `bucket_bytes`, one all-reduce each on the gradients' own group (dist.h), and, when `arm()` was
// called before the step's last backward, overlapped with that backward (docs/distributed.md,
// "Gradients"): a hook on each parameter copies its gradient into its bucket's buffer as soon as autograd
// has computed it, and a bucket whose parameters are all in starts its all-reduce while backward goes
// on. Buckets hold the parameters in reverse order (backward reaches the last layers first) and start
// strictly in bucket order, so every rank starts the same all-reduces in the same order, whatever order
// its hooks fire in. A parameter whose gradient is undefined on every rank stays undefined; one that has a
// gradient on some rank only gets zeros from the others, as it would in one process holding the whole
// batch (each bucket carries a presence flag per parameter). In a single process nothing happens.
class GradientReducer {
 public:
  // Over the ranks of `group`: the world (data parallelism), or the replica group (expert shards, whose
  // gradients the exchanges already summed over the expert group).
  GradientReducer(std::vector<torch::Tensor> params, int64_t bucket_bytes, Group group = Group::kWorld);
  ~GradientReducer();  // removes the hooks
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // The next backward, of `loss`, is the step's last (earlier micro-batches only accumulate): start
  // buckets in it. The parameters `loss`'s graph does not reach (an expert no token of this rank chose)
  // are complete at once, as DDP's find_unused_parameters does, so that they do not hold back their
  // bucket and every bucket after it.
  void arm(const torch::Tensor& loss);
  // After the step's backward passes: starts the buckets not started yet, waits for all of them and
  // writes the averages into the parameters' gradients.
  void finish();

  int64_t n_buckets() const { return int64_t(buckets_.size()); }
  // Buckets started from inside backward in the last finish()ed step (the overlap that took place).
  int64_t started_in_backward() const { return last_started_in_backward_; }

 private:
  struct Bucket {
    std::vector<size_t> params;   // indices into params_
    std::vector<int64_t> offset;  // of each parameter's gradient in `flat`
    torch::Tensor flat;           // the gradients, then one presence flag per parameter
    int64_t filled = 0;
    int64_t handle = -1;  // its all-reduce, once started
  };
  void fill(size_t param, const torch::Tensor& incoming);
  void start(Bucket& b);
  void start_ready();

  std::vector<torch::Tensor> params_;
  Group group_;
  std::vector<Bucket> buckets_;
  std::vector<std::pair<size_t, size_t>> where_;  // parameter -> (bucket, slot)
  std::vector<bool> in_;                          // parameter's gradient copied this step
  std::vector<unsigned> hooks_;
  bool armed_ = false;
  size_t next_ = 0;  // the next bucket to start
  int64_t started_in_backward_ = 0, last_started_in_backward_ = 0;
};

// One step's GradientReducer without the overlap: after backward, average `params`' gradients.
void average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes = 16 << 20);

// Copies rank `root`'s parameters and buffers of `module` into every rank's (identical initialisation),
// but for the parameters named in `skip` (expert shards, which are each rank's own).
void broadcast_module(torch::nn::Module& module, int root = 0, const std::set<std::string>* skip = nullptr);

// FNV-1a of every parameter and buffer's bytes, in name order, but for those named in `skip`: equal on
// ranks that hold the same state.
uint64_t module_digest(const torch::nn::Module& module, const std::set<std::string>* skip = nullptr);

// clip_grad_norm (train/optim.h) with expert parallelism: the norm is over the replicated parameters
// (the same on every rank) and every rank's shard (summed over the ranks of its expert group), so it is the
// norm of all the model's gradients, the same on every rank; both lists are then scaled by the same factor.
double clip_grad_norm_sharded(const std::vector<torch::Tensor>& replicated,
                              const std::vector<torch::Tensor>& sharded, double max_norm);

}  // namespace moeforge::dist
