// Data parallelism's synchronisation points (sync.h, docs/distributed.md).
#include "moeforge/dist/sync.h"

#include <cmath>

#include "moeforge/dist/dist.h"

namespace moeforge::dist {
namespace {

torch::Tensor longs(const std::vector<int64_t>& v) {
  return torch::tensor(v, torch::kLong);
}

std::vector<int64_t> to_longs(const torch::Tensor& t) {
  auto c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::vector<double> to_doubles(const torch::Tensor& t) {
  auto c = t.contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

}  // namespace

void globalize_feedback(RouteFeedback& fb) {
  if (!active()) return;
  // The integer sums in one all-reduce, the real ones in another; each vector keeps its length, which
  // every rank shares (same layer, same number of experts and groups).
  std::vector<int64_t> ints = {fb.n_tokens, fb.loss_count};
  auto append = [&](const std::vector<int64_t>& v) { ints.insert(ints.end(), v.begin(), v.end()); };
  append(fb.load);
  append(fb.group_load);
  append(fb.out_rows);
  append(fb.nonfinite);
  append(fb.expert_loss_count);
  append(fb.expert_loss_bad);
  std::vector<double> reals = {fb.loss_sum};
  reals.insert(reals.end(), fb.out_sum_sq.begin(), fb.out_sum_sq.end());
  reals.insert(reals.end(), fb.expert_loss_sum.begin(), fb.expert_loss_sum.end());
  std::vector<torch::Tensor> t = {longs(ints), torch::tensor(reals, torch::kDouble)};
  allreduce_sum(t, "the router feedback's sums");
  auto gi = to_longs(t[0]);
  auto gr = to_doubles(t[1]);
  size_t i = 0;
  fb.n_tokens = gi[i++];
  fb.loss_count = gi[i++];
  for (auto* v :
       {&fb.load, &fb.group_load, &fb.out_rows, &fb.nonfinite, &fb.expert_loss_count, &fb.expert_loss_bad})
    for (auto& x : *v) x = gi[i++];
  size_t j = 0;
  fb.loss_sum = gr[j++];
  for (auto* v : {&fb.out_sum_sq, &fb.expert_loss_sum})
    for (auto& x : *v) x = gr[j++];
  for (auto& s : fb.scores) s = allgather_cat(s, "the router scores");
  for (auto& s : fb.seq_repr) s = allgather_cat(s, "the sequence representations");
  for (auto& s : fb.seq_cluster) s = allgather_cat(s, "the sequence clusters");
}

RoutingStats global_stats(const RoutingStats& stats) {
  if (!active()) return stats;
  std::vector<int64_t> ints = {stats.n_tokens, stats.n_requested};
  ints.insert(ints.end(), stats.load.begin(), stats.load.end());
  ints.insert(ints.end(), stats.group_load.begin(), stats.group_load.end());
  std::vector<torch::Tensor> t = {longs(ints)};
  allreduce_sum(t, "the routing stats");
  auto g = to_longs(t[0]);
  const size_t E = stats.load.size();
  std::vector<int64_t> load(g.begin() + 2, g.begin() + 2 + long(E));
  auto out = make_routing_stats(load, g[0], g[1], stats.n_balanced);
  out.group_load.assign(g.begin() + 2 + long(E), g.end());
  return out;
}

void average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  if (!active()) return;
  torch::NoGradGuard ng;
  // Which parameters have a gradient anywhere: a parameter no token of the global batch reached keeps an
  // undefined gradient, as in one process (the optimiser skips it).
  auto has = torch::zeros({int64_t(params.size())}, torch::kLong);
  for (size_t i = 0; i < params.size(); ++i) has[int64_t(i)] = params[i].grad().defined() ? 1 : 0;
  std::vector<torch::Tensor> h{has};
  allreduce_sum(h, "the gradient presence flags");
  auto any = to_longs(h[0]);
  const double inv = 1.0 / double(world());
  // Buckets of consecutive float parameters of one dtype, flattened into one buffer each.
  size_t i = 0;
  while (i < params.size()) {
    if (any[i] == 0) {
      ++i;
      continue;
    }
    std::vector<size_t> bucket;
    int64_t bytes = 0;
    const auto dtype = params[i].scalar_type();
    while (i < params.size() && (bucket.empty() || bytes + params[i].nbytes() <= size_t(bucket_bytes))) {
      if (any[i] == 0) {
        ++i;
        continue;
      }
      if (params[i].scalar_type() != dtype) break;
      bucket.push_back(i);
      bytes += int64_t(params[i].nbytes());
      ++i;
    }
    std::vector<torch::Tensor> grads;
    for (size_t k : bucket) {
      auto& p = params[k];
      if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
      grads.push_back(p.grad().reshape({-1}));
    }
    std::vector<torch::Tensor> flat{torch::cat(grads).cpu().contiguous()};
    allreduce_sum(flat, "the gradients");
    flat[0].mul_(inv);
    int64_t off = 0;
    for (size_t k : bucket) {
      auto& g = params[k].mutable_grad();
      const int64_t n = g.numel();
      g.copy_(flat[0].narrow(0, off, n).view_as(g));
      off += n;
    }
  }
}

void broadcast_module(torch::nn::Module& module, int root, const std::set<std::string>* skip) {
  if (!active()) return;
  torch::NoGradGuard ng;
  for (auto& p : module.named_parameters()) {
    if (skip && skip->count(p.key())) continue;
    auto t = p.value().detach();
    std::vector<torch::Tensor> one{t.contiguous()};
    broadcast(one, root, "parameter " + p.key());
    if (!t.is_contiguous()) t.copy_(one[0]);
  }
  for (auto& b : module.named_buffers()) {
    auto t = b.value();
    if (!t.defined() || t.numel() == 0) continue;
    std::vector<torch::Tensor> one{t.contiguous()};
    broadcast(one, root, "buffer " + b.key());
    if (!t.is_contiguous()) t.copy_(one[0]);
  }
}

uint64_t module_digest(const torch::nn::Module& module, const std::set<std::string>* skip) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const torch::Tensor& t) {
    if (!t.defined()) return;
    auto c = t.detach().cpu().contiguous();
    const auto* p = static_cast<const unsigned char*>(c.data_ptr());
    for (size_t i = 0; i < c.nbytes(); ++i) h = (h ^ p[i]) * 1099511628211ull;
  };
  for (auto& p : module.named_parameters())
    if (!skip || !skip->count(p.key())) mix(p.value());
  for (auto& b : module.named_buffers()) mix(b.value());
  return h;
}

double clip_grad_norm_sharded(const std::vector<torch::Tensor>& replicated,
                              const std::vector<torch::Tensor>& sharded, double max_norm) {
  torch::NoGradGuard ng;
  auto sq = [](const std::vector<torch::Tensor>& ps) {
    double s = 0;
    for (auto& p : ps)
      if (p.grad().defined()) s += p.grad().to(torch::kDouble).pow(2).sum().item<double>();
    return s;
  };
  std::vector<torch::Tensor> t{torch::tensor({sq(sharded)}, torch::kDouble)};
  allreduce_sum(t, "the expert shards' squared gradient norms");
  const double norm = std::sqrt(sq(replicated) + t[0].item<double>());
  // The same rule as clip_grad_norm (src/train/optim.cpp).
  if (max_norm > 0 && norm > max_norm && std::isfinite(norm)) {
    const double scale = max_norm / (norm + 1e-6);
    for (const auto* ps : {&replicated, &sharded})
      for (auto& p : *ps)
        if (p.grad().defined()) p.mutable_grad().mul_(scale);
  }
  return norm;
}

}  // namespace moeforge::dist
