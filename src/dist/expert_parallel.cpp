// Expert parallelism's exchanges (expert_parallel.h, docs/distributed.md).
#include "moeforge/dist/expert_parallel.h"

#include <stdexcept>
#include <string>

#include "moeforge/dist/dist.h"

namespace moeforge::dist {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// The rows all-to-all as an autograd function: the backward sends each row's gradient back where the row
// came from (the same exchange with send and receive counts swapped).
struct AllToAllRows : public torch::autograd::Function<AllToAllRows> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, std::vector<int64_t> send,
                               std::vector<int64_t> recv) {
    ctx->saved_data["send"] = send;
    ctx->saved_data["recv"] = recv;
    ctx->saved_data["cols"] = x.size(1);
    return all_to_all_rows(x, send, recv, "the expert rows", Group::kExperts);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grad) {
    const auto send = ctx->saved_data["send"].toIntVector();
    const auto recv = ctx->saved_data["recv"].toIntVector();
    int64_t rows = 0;
    for (int64_t n : recv) rows += n;
    // Every rank must make the exchange, even one whose rows got no gradient.
    auto g = grad[0].defined() ? grad[0] : torch::zeros({rows, ctx->saved_data["cols"].toInt()});
    return {all_to_all_rows(g.contiguous(), recv, send, "the expert rows' gradients", Group::kExperts),
            torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

ExpertShard expert_shard(int64_t n_expert, int rank, int world) {
  if (world < 1 || n_expert % world != 0)
    throw std::invalid_argument("moe.n_expert: " + std::to_string(n_expert) +
                                " experts do not split evenly over " + std::to_string(world) +
                                " expert-parallel ranks");
  const int64_t per = n_expert / world;
  return {per * rank, per};
}

ExchangePlan plan_exchange(const std::vector<int64_t>& off, int64_t n_expert) {
  const int W = group_size(Group::kExperts), r = group_rank(Group::kExperts);
  TORCH_CHECK(int64_t(off.size()) == n_expert + 1, "dist::plan_exchange: ", off.size(), " offsets for ",
              n_expert, " experts");
  ExchangePlan ex;
  ex.n_expert = n_expert;
  ex.shard = expert_shard(n_expert, r, W);
  const int64_t El = ex.shard.count;
  // This rank's rows per expert; rank d owns experts [d*El, (d+1)*El), so the rows for d are contiguous.
  auto counts = torch::empty({n_expert}, torch::kLong);
  for (int64_t e = 0; e < n_expert; ++e) counts[e] = off[size_t(e) + 1] - off[size_t(e)];
  ex.send_rows.assign(size_t(W), 0);
  for (int d = 0; d < W; ++d) ex.send_rows[size_t(d)] = off[size_t((d + 1) * El)] - off[size_t(d * El)];
  // Counts first: rank s's counts for my experts arrive as the s-th block of E_l numbers.
  const std::vector<int64_t> blocks(size_t(W), El);
  auto got = all_to_all_rows(counts, blocks, blocks, "the expert row counts", Group::kExperts)
                 .contiguous();  // [W * E_l]
  const int64_t* c = got.data_ptr<int64_t>();
  ex.recv_rows.assign(size_t(W), 0);
  for (int s = 0; s < W; ++s)
    for (int64_t j = 0; j < El; ++j) ex.recv_rows[size_t(s)] += c[s * El + j];
  // Received rows are rank-major (s, then j); the experts want them expert-major (j, then s).
  std::vector<int64_t> start(size_t(W * El), 0);  // first received row of block (s, j)
  int64_t pos = 0;
  for (int s = 0; s < W; ++s)
    for (int64_t j = 0; j < El; ++j) start[size_t(s * El + j)] = pos, pos += c[s * El + j];
  ex.local_offsets.assign(size_t(El + 1), 0);
  std::vector<int64_t> order;
  order.reserve(size_t(pos));
  for (int64_t j = 0; j < El; ++j) {
    for (int s = 0; s < W; ++s)
      for (int64_t i = 0; i < c[s * El + j]; ++i) order.push_back(start[size_t(s * El + j)] + i);
    ex.local_offsets[size_t(j + 1)] = int64_t(order.size());
  }
  ex.regroup = torch::tensor(order, torch::kLong);
  return ex;
}

torch::Tensor dispatch_exchange(const torch::Tensor& x_sorted, const ExchangePlan& ex) {
  if (!active()) return x_sorted;
  auto received = AllToAllRows::apply(x_sorted, ex.send_rows, ex.recv_rows);  // [M, C] rank-major
  return received.index_select(0, ex.regroup.to(received.device()));          // expert-major
}

torch::Tensor combine_exchange(const torch::Tensor& y_local, const ExchangePlan& ex) {
  if (!active()) return y_local;
  // Back to rank-major (the inverse permutation), then each row to the rank it came from.
  auto rank_major = torch::zeros_like(y_local).index_copy(0, ex.regroup.to(y_local.device()), y_local);
  return AllToAllRows::apply(rank_major, ex.recv_rows, ex.send_rows);
}

}  // namespace moeforge::dist
