// Data parallelism's synchronisation points (docs/distributed.md): what every rank must agree on after
// each step, built on the collectives of dist.h. All of them are no-ops in a single process.
#pragma once

#include <torch/torch.h>

#include <set>
#include <string>
#include <vector>

#include "moeforge/routing/feedback.h"
#include "moeforge/routing/stats.h"

namespace moeforge::dist {

// Makes one step's router feedback that of the global batch, on every rank: per-expert loads, health and
// loss sums are summed over ranks; each micro-batch's scores, sequence representations and clusters are
// the concatenation of every rank's rows in rank order, i.e. the rows of that micro-batch of the global
// batch (each rank holds a contiguous slice of it, rank 0 first). A stateful router's after_step then
// updates loss-free bias, BIP's dual, EC thresholds, reliability EMAs and MoCE centroids exactly as one
// process with the whole global batch would, and identically on every rank.
void globalize_feedback(RouteFeedback& fb);

// The routing stats of the global batch from each rank's `stats` (loads and counts summed over ranks).
RoutingStats global_stats(const RoutingStats& stats);

// Averages the gradients of `params` over ranks, in buckets of at most `bucket_bytes` (one all-reduce per
// bucket). A parameter whose gradient is undefined on every rank stays undefined; one that has a gradient
// on some rank only gets zeros from the others, as it would in one process holding the whole batch.
void average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes = 16 << 20);

// Copies rank `root`'s parameters and buffers of `module` into every rank's (identical initialisation),
// but for the parameters named in `skip` (expert shards, which are each rank's own).
void broadcast_module(torch::nn::Module& module, int root = 0, const std::set<std::string>* skip = nullptr);

// FNV-1a of every parameter and buffer's bytes, in name order, but for those named in `skip`: equal on
// ranks that hold the same state.
uint64_t module_digest(const torch::nn::Module& module, const std::set<std::string>* skip = nullptr);

// clip_grad_norm (train/optim.h) with expert parallelism: the norm is over the replicated parameters
// (the same on every rank) and every rank's shard (summed over ranks), so it is the norm of all the
// model's gradients, the same on every rank; both lists are then scaled by the same factor.
double clip_grad_norm_sharded(const std::vector<torch::Tensor>& replicated,
                              const std::vector<torch::Tensor>& sharded, double max_norm);

}  // namespace moeforge::dist
