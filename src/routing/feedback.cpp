// Accumulating a step's routing feedback over micro-batches (feedback.h, docs/routing.md "State updates").
#include "moeforge/routing/feedback.h"

#include <cmath>

#include "moeforge/dist/dist.h"
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
  if (!plan.sequence_rows.empty()) {
    std::vector<torch::Tensor> rows;
    for (const auto& r : plan.sequence_rows) rows.push_back(r.detach());
    sequence_rows.push_back(std::move(rows));
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

torch::Tensor RouteFeedback::all_sequence_rows(size_t item) const {
  std::vector<torch::Tensor> parts;
  for (const auto& rows : sequence_rows) {
    TORCH_CHECK(item < rows.size(), "RouteFeedback: a micro-batch has ", rows.size(), " sequence rows, not ",
                item + 1);
    parts.push_back(rows[item]);
  }
  if (parts.empty()) return {};
  return torch::cat(parts, 0);
}

std::vector<double> RouteFeedback::out_rms() const {
  std::vector<double> r(out_sum_sq.size(), 0.0);
  for (size_t e = 0; e < r.size(); ++e)
    if (out_rows[e] > 0) r[e] = std::sqrt(out_sum_sq[e] / double(out_rows[e]));
  return r;
}

void globalize_feedback(RouteFeedback& fb) {
  if (!dist::active()) return;
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
  std::vector<torch::Tensor> t = {torch::tensor(ints, torch::kLong), torch::tensor(reals, torch::kDouble)};
  dist::allreduce_sum(t, "the router feedback's sums");
  auto gi = t[0].contiguous();
  auto gr = t[1].contiguous();
  const int64_t* pi = gi.data_ptr<int64_t>();
  const double* pr = gr.data_ptr<double>();
  fb.n_tokens = *pi++;
  fb.loss_count = *pi++;
  for (auto* v :
       {&fb.load, &fb.group_load, &fb.out_rows, &fb.nonfinite, &fb.expert_loss_count, &fb.expert_loss_bad})
    for (auto& x : *v) x = *pi++;
  fb.loss_sum = *pr++;
  for (auto* v : {&fb.out_sum_sq, &fb.expert_loss_sum})
    for (auto& x : *v) x = *pr++;
  for (auto& s : fb.scores) s = dist::allgather_cat(s, "the router scores");
  for (auto& rows : fb.sequence_rows)
    for (auto& r : rows) r = dist::allgather_cat(r, "the router's sequence rows");
}

}  // namespace moeforge
