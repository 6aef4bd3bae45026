// Expert parallelism's communication (docs/distributed.md, "Expert parallelism"): the experts of a layer
// sharded over the W ranks, and the two exchanges that move each assignment's row to the rank that owns
// its expert and back. They sit between the MoE layer's stages and do no local work of their own:
//
//   x_sorted = dispatch(x, plan)                    stage 2, local: rows grouped by expert
//   ex       = plan_exchange(plan.offsets(), E)     all-to-all of the counts
//   x_local  = dispatch_exchange(x_sorted, ex)      all-to-all of the rows, regrouped by local expert
//   y_local  = experts(x_local, ex.local_offsets)   stage 3, local: this rank's experts only
//   y_sorted = combine_exchange(y_local, ex)        the reverse all-to-all
//   y        = combine(y_sorted, plan, T)           stage 4, local
//
// Both row exchanges are autograd functions whose backward is the reverse exchange. In one process every
// rank is this one: the exchanges return their input.
//
// Legend: W ranks, E experts (W divides E), E_l = E / W local experts, N this rank's assignments, M the
// rows its experts receive, C model width.
#pragma once

#include <torch/torch.h>

#include <vector>

namespace moeforge::dist {

// Rank r owns experts [first, first + count), first = r * E / W.
struct ExpertShard {
  int64_t first = 0;
  int64_t count = 0;
};
// Throws std::invalid_argument naming moe.n_expert when W does not divide E.
ExpertShard expert_shard(int64_t n_expert, int rank, int world);

struct ExchangePlan {
  int64_t n_expert = 0;
  ExpertShard shard;
  std::vector<int64_t> send_rows;      // [W] rows this rank sends to each rank (its assignments to them)
  std::vector<int64_t> recv_rows;      // [W] rows it receives from each rank
  std::vector<int64_t> local_offsets;  // [E_l + 1] the received rows grouped by local expert
  torch::Tensor
      regroup;  // [M] int64: row i of x_local is received row regroup[i] (rank-major -> expert-major)
};

// The first all-to-all: every rank learns how many rows each rank sends it for each of its experts.
// `expert_offsets` [E + 1] are this rank's plan offsets.
ExchangePlan plan_exchange(const std::vector<int64_t>& expert_offsets, int64_t n_expert);

// [N, C] rows in this rank's plan order -> [M, C] rows for this rank's experts, grouped by local expert
// (inside an expert: rank 0's rows first, each rank's in its plan order).
torch::Tensor dispatch_exchange(const torch::Tensor& x_sorted, const ExchangePlan& ex);
// The reverse: [M, C] grouped as dispatch_exchange returned them -> [N, C] in this rank's plan order.
torch::Tensor combine_exchange(const torch::Tensor& y_local, const ExchangePlan& ex);

}  // namespace moeforge::dist
