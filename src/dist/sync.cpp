// Data parallelism's synchronisation points (sync.h, docs/distributed.md).
#include "moeforge/dist/sync.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>

#include <cmath>
#include <unordered_set>

#include "moeforge/dist/dist.h"

namespace moeforge::dist {

GradientReducer::GradientReducer(std::vector<torch::Tensor> params, int64_t bucket_bytes, Group group)
    : params_(std::move(params)), group_(group) {
  if (group_size(group_) <= 1) return;
  where_.resize(params_.size());
  in_.assign(params_.size(), false);
  // Buckets of consecutive parameters of one dtype, last parameter first.
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const auto& p = params_[k];
    if (buckets_.empty() || p.scalar_type() != params_[buckets_.back().params.front()].scalar_type() ||
        bytes + int64_t(p.nbytes()) > bucket_bytes) {
      buckets_.emplace_back();
      bytes = 0;
    }
    auto& b = buckets_.back();
    where_[k] = {buckets_.size() - 1, b.params.size()};
    b.params.push_back(k);
    bytes += int64_t(p.nbytes());
  }
  for (auto& b : buckets_) {
    int64_t n = 0;
    for (size_t k : b.params) b.offset.push_back(n), n += params_[k].numel();
    b.flat = torch::empty({n + int64_t(b.params.size())},
                          params_[b.params.front()].options().requires_grad(false));
  }
  for (size_t k = 0; k < params_.size(); ++k) {
    if (!params_[k].requires_grad()) continue;
    // The gradient itself is left as autograd computed it (a hook that returns nothing).
    hooks_.push_back(params_[k].register_hook([this, k](const torch::Tensor& g) {
      if (armed_) fill(k, g);
    }));
  }
}

GradientReducer::~GradientReducer() {
  size_t h = 0;
  for (size_t k = 0; k < params_.size() && h < hooks_.size(); ++k)
    if (params_[k].requires_grad()) params_[k].remove_hook(hooks_[h++]);
}

void GradientReducer::arm(const torch::Tensor& loss) {
  if (where_.empty()) return;  // a group of one rank
  armed_ = true;
  // The nodes of the graph backward will run, from the loss down to the parameters' accumulators.
  std::unordered_set<const torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> todo;
  if (loss.grad_fn()) todo.push_back(loss.grad_fn().get());
  while (!todo.empty()) {
    auto* n = todo.back();
    todo.pop_back();
    if (!seen.insert(n).second) continue;
    for (const auto& e : n->next_edges())
      if (e.function && !seen.count(e.function.get())) todo.push_back(e.function.get());
  }
  for (size_t k = 0; k < params_.size(); ++k) {
    auto acc = torch::autograd::impl::try_get_grad_accumulator(params_[k]);
    if (!acc || !seen.count(acc.get())) fill(k, torch::Tensor());  // backward will not reach it
  }
}

// Parameter `param`'s gradient of the step, i.e. what earlier micro-batches accumulated in .grad plus
// `incoming` (undefined: nothing more), into its slot; the bucket starts when it is the next one and full.
void GradientReducer::fill(size_t param, const torch::Tensor& incoming) {
  torch::NoGradGuard ng;
  const auto [bi, slot] = where_[param];
  auto& b = buckets_[bi];
  TORCH_CHECK(b.handle < 0 && !in_[param], "GradientReducer: a gradient of parameter ", param,
              " arrived after its bucket had been filled (two backward passes after arm()?)");
  const auto& p = params_[param];
  const auto& prev = p.grad();
  auto dst = b.flat.narrow(0, b.offset[slot], p.numel()).view(p.sizes());
  if (prev.defined() && incoming.defined())
    torch::add_out(dst, prev, incoming);  // what autograd's accumulation computes
  else if (incoming.defined())
    dst.copy_(incoming);
  else if (prev.defined())
    dst.copy_(prev);
  else
    dst.zero_();
  b.flat[b.flat.numel() - int64_t(b.params.size()) + int64_t(slot)] =
      (prev.defined() || incoming.defined()) ? 1.0 : 0.0;
  in_[param] = true;
  ++b.filled;
  if (armed_) start_ready();
}

void GradientReducer::start(Bucket& b) {
  b.handle = start_grad_allreduce(
      b.flat,
      std::string(group_ == Group::kReplicas ? "the expert shards' gradients" : "the gradients") +
          " (bucket " + std::to_string(&b - buckets_.data()) + " of " + std::to_string(buckets_.size()) + ")",
      group_);
}

void GradientReducer::start_ready() {
  while (next_ < buckets_.size() && buckets_[next_].filled == int64_t(buckets_[next_].params.size())) {
    start(buckets_[next_++]);
    ++started_in_backward_;
  }
}

void GradientReducer::finish() {
  if (where_.empty()) return;
  torch::NoGradGuard ng;
  armed_ = false;
  for (; next_ < buckets_.size(); ++next_) {
    auto& b = buckets_[next_];
    for (size_t k : b.params)
      if (!in_[k]) fill(k, torch::Tensor());  // not reached by the last backward
    start(b);
  }
  const double inv = 1.0 / double(group_size(group_));
  for (auto& b : buckets_) {
    wait_grad_allreduce(b.handle);
    b.flat.mul_(inv);
    const int64_t flags = b.flat.numel() - int64_t(b.params.size());
    for (size_t slot = 0; slot < b.params.size(); ++slot) {
      auto& p = params_[b.params[slot]];
      if (b.flat[flags + int64_t(slot)].item<double>() == 0) {
        p.mutable_grad() = torch::Tensor();  // no rank had a gradient for it
        continue;
      }
      auto avg = b.flat.narrow(0, b.offset[slot], p.numel()).view(p.sizes());
      if (p.grad().defined())
        p.mutable_grad().copy_(avg);
      else
        p.mutable_grad() = avg.clone();
    }
    b.filled = 0;
    b.handle = -1;
  }
  in_.assign(params_.size(), false);
  next_ = 0;
  last_started_in_backward_ = started_in_backward_;
  started_in_backward_ = 0;
}

void average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  GradientReducer(params, bucket_bytes).finish();
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
  allreduce_sum(t, "the expert shards' squared gradient norms", Group::kExperts);
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
