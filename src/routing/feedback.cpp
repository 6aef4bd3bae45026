// Accumulating a step's routing feedback over micro-batches (feedback.h, docs/routing.md "State updates").
#include "moeforge/routing/feedback.h"

#include <cmath>

#include "moeforge/routing/router.h"

namespace moeforge {

namespace {

void add_into(std::vector<int64_t>& sum, const std::vector<int64_t>& v) {
  if (sum.empty()) sum.assign(v.size(), 0);
  TORCH_CHECK(sum.size() == v.size(), "RouteFeedback: ", v.size(), " entries where earlier plans had ",
              sum.size());
  for (size_t i = 0; i < v.size(); ++i) sum[i] += v[i];
}

}  // namespace

void RouteFeedback::add_plan(const RoutingPlan& plan) {
  ++micro_batches;
  n_tokens += plan.stats.n_tokens;
  add_into(load, plan.stats.load);
  if (!plan.stats.group_load.empty()) add_into(group_load, plan.stats.group_load);
  if (plan.scores.defined()) scores.push_back(plan.scores.detach());
  if (plan.seq_repr.defined()) {
    seq_repr.push_back(plan.seq_repr.detach());
    seq_cluster.push_back(plan.seq_cluster.to(torch::kCPU, torch::kLong));
  }
}

void RouteFeedback::add_health(const RoutingPlan& plan, const torch::Tensor& out_rms_e,
                               const torch::Tensor& nonfinite_e) {
  const int64_t E = plan.n_expert();
  if (!has_health) {
    out_sum_sq.assign(size_t(E), 0.0);
    out_rows.assign(size_t(E), 0);
    nonfinite.assign(size_t(E), 0);
    has_health = true;
  }
  const auto off = plan.offsets();
  auto rms = out_rms_e.to(torch::kCPU, torch::kDouble).contiguous();
  auto bad = nonfinite_e.to(torch::kCPU, torch::kLong).contiguous();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    const double r = rms.data_ptr<double>()[e];
    // A non-finite RMS stays non-finite in the sum, so the step's RMS of that expert is non-finite too.
    out_sum_sq[e] += n > 0 ? r * r * double(n) : 0.0;
    out_rows[e] += n;
    nonfinite[e] += bad.data_ptr<int64_t>()[e];
  }
}

void RouteFeedback::add_token_loss(const RoutingPlan& plan, const torch::Tensor& token_loss) {
  const int64_t E = plan.n_expert();
  if (!has_loss) {
    expert_loss_sum.assign(size_t(E), 0.0);
    expert_loss_count.assign(size_t(E), 0);
    expert_loss_bad.assign(size_t(E), 0);
    has_loss = true;
  }
  auto tl = token_loss.detach().reshape({-1}).to(torch::kCPU, torch::kDouble).contiguous();
  const double* l = tl.data_ptr<double>();
  for (int64_t t = 0; t < tl.numel(); ++t)
    if (std::isfinite(l[t])) loss_sum += l[t], ++loss_count;
  const auto off = plan.offsets();
  auto tok = plan.token_index.to(torch::kCPU).contiguous();
  const int64_t* ti = tok.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      const double v = l[ti[i]];
      if (std::isfinite(v))
        expert_loss_sum[e] += v, ++expert_loss_count[e];
      else
        ++expert_loss_bad[e];
    }
}

torch::Tensor RouteFeedback::all_scores() const {
  if (scores.empty()) return {};
  return scores.size() == 1 ? scores.front() : torch::cat(scores, 0);
}

std::vector<double> RouteFeedback::out_rms() const {
  std::vector<double> r(out_sum_sq.size(), 0.0);
  for (size_t e = 0; e < r.size(); ++e)
    if (out_rows[e] > 0) r[e] = std::sqrt(out_sum_sq[e] / double(out_rows[e]));
  return r;
}

}  // namespace moeforge
