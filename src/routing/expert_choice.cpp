// Expert-choice routing, docs/routing.md section 2. Legend: B sequences, S positions, T = B*S, E experts.
#include "moeforge/routing/expert_choice.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "moeforge/config/binder.h"
#include "moeforge/routing/losses.h"
#include "option_checks.h"

namespace moeforge {

RoutingPlan build_plan_from_mask(const torch::Tensor& mask, const torch::Tensor& scores) {
  const int64_t T = mask.size(0), E = mask.size(1);
  auto mask_et = mask.t().to(torch::kCPU).contiguous();  // [E, T]
  auto pairs = mask_et.nonzero();                        // [N, 2] (e, t), row-major: grouped by expert
  auto expert = pairs.select(1, 0).contiguous();         // [N]
  auto token = pairs.select(1, 1).contiguous();          // [N]
  auto count_t = mask_et.sum(1).to(torch::kLong);        // [E]
  auto offsets = torch::zeros({E + 1}, torch::kLong);    // [E+1]
  offsets.narrow(0, 1, E).copy_(count_t.cumsum(0));

  RoutingPlan plan;
  const auto device = scores.device();
  plan.token_index = token.to(device);
  plan.expert_offsets = offsets;
  plan.gate = scores.reshape({T * E}).index_select(0, (token * E + expert).to(device));  // [N]
  plan.aux_loss = torch::zeros({}, scores.options());
  std::vector<int64_t> load(count_t.data_ptr<int64_t>(), count_t.data_ptr<int64_t>() + E);
  const int64_t n = plan.token_index.numel();
  plan.stats = make_routing_stats(std::move(load), T, n);  // EC drops nothing: requested = kept
  return plan;
}

int64_t ec_capacity(int64_t n_tokens, double capacity_factor, int64_t n_expert) {
  return static_cast<int64_t>(std::floor(double(n_tokens) * capacity_factor / double(n_expert) + 0.5));
}

int64_t ec_position_capacity(int64_t p, int64_t e, int64_t n_seq, double capacity_factor, int64_t n_expert) {
  // Expert e's schedule is shifted by its own phase (e + 1/2) / E, so that the positions where one expert
  // rounds down are positions where others round up: at every position the E experts together take
  // floor or ceil of B * CF tokens (docs/routing.md, expert choice).
  const double c = double(n_seq) * capacity_factor / double(n_expert);
  const double phase = (double(e) + 0.5) / double(n_expert);
  return static_cast<int64_t>(std::floor(double(p + 1) * c + phase) - std::floor(double(p) * c + phase));
}

ExpertChoiceRouterImpl::ExpertChoiceRouterImpl(const MoEConfig& cfg, int64_t d_model)
    : cfg_(cfg), n_expert_(cfg.routed_experts()), eval_routing_(cfg.expert_choice.eval) {
  // nn.Linear's default initialisation, as the token-choice router.
  const double bound = 1.0 / std::sqrt(double(d_model));
  weight = register_parameter("weight", torch::empty({n_expert_, d_model}).uniform_(-bound, bound));
  // Before any calibration, 1/E: the score of every expert under a uniform softmax. Only threshold
  // routing reads it, and calibration replaces it outright at the first update.
  threshold = register_buffer("threshold", torch::full({n_expert_}, 1.0 / double(n_expert_)));
  threshold_steps = register_buffer("threshold_steps", torch::zeros({}, torch::kLong));
  register_expert_mask(n_expert_);
}

std::string ExpertChoiceRouterImpl::name() const {
  // Non-causal EC says so in its name: it leaks the future of a sequence (docs/routing.md section 2).
  switch (cfg_.expert_choice.mode) {
    case ECMode::kCausal:
      return "expert_choice(causal)";
    case ECMode::kNonCausal:
      return "expert_choice(noncausal: leaks the future)";
    case ECMode::kThreshold:
      return "expert_choice(threshold)";
  }
  return "expert_choice";
}

torch::Tensor ExpertChoiceRouterImpl::select_noncausal(const torch::Tensor& s) const {
  // NON-CAUSAL: expert e takes the k_e best tokens of the whole batch, so a position's routing depends
  // on later positions of its own sequence (Zhou et al. 2022 as published).
  const int64_t T = s.size(0);
  const int64_t k = std::min(ec_capacity(T, cfg_.expert_choice.capacity_factor, n_expert_), T);
  auto mask = torch::zeros(s.sizes(), s.options().dtype(torch::kBool));  // [T, E]
  if (k == 0) return mask;
  auto idx = std::get<1>(s.detach().topk(k, 0));  // [k, E] tokens chosen by each expert
  return mask.scatter_(0, idx, true);
}

torch::Tensor ExpertChoiceRouterImpl::select_causal(const torch::Tensor& s, int64_t n_seq) const {
  // Causal-safe: the choice for position p is made among the B tokens at position p (one per sequence),
  // with a per-position capacity fixed in advance, so nothing at positions > p of any sequence can move
  // it. The B sequences are rows b*S..b*S+S-1 of s.
  const int64_t T = s.size(0), E = s.size(1), B = n_seq;
  TORCH_CHECK(B >= 1 && T % B == 0, "expert_choice: T = ", T, " is not a multiple of n_seq = ", B);
  const int64_t S = T / B;
  auto s_sbe = s.detach().reshape({B, S, E}).permute({1, 0, 2});  // [S, B, E]
  // Per-(position, expert) capacities; one topk of the largest over the B tokens at each position, then
  // expert e keeps the first cap[p][e] of its ranking.
  auto cap = torch::empty({S, 1, E}, torch::kLong);  // [S, 1, E]
  int64_t* cp = cap.data_ptr<int64_t>();
  int64_t vmax = 0;
  for (int64_t p = 0; p < S; ++p)
    for (int64_t e = 0; e < E; ++e) {
      cp[p * E + e] = std::min(ec_position_capacity(p, e, B, cfg_.expert_choice.capacity_factor, E), B);
      vmax = std::max(vmax, cp[p * E + e]);
    }
  auto mask_sbe = torch::zeros({S, B, E}, s.options().dtype(torch::kBool));  // [S, B, E]
  if (vmax > 0) {
    auto idx = std::get<1>(s_sbe.topk(vmax, 1));                       // [S, vmax, E]
    auto rank = torch::arange(vmax, torch::kLong).view({1, vmax, 1});  // [1, vmax, 1]
    auto take = (rank < cap).to(s.device());                           // [S, vmax, E]
    mask_sbe.scatter_(1, idx, take);
  }
  return mask_sbe.permute({1, 0, 2}).reshape({T, E});
}

torch::Tensor ExpertChoiceRouterImpl::select_threshold(const torch::Tensor& s) const {
  // Generation-time EC: a token goes to every expert whose score passes its threshold, and at least to
  // its top-1 (docs/routing.md section 2). Per token, so causal.
  auto sd = s.detach();
  auto mask = sd >= threshold.to(s.device()).unsqueeze(0);  // [T, E]
  if (has_pruned()) {
    // A pruned expert passes no threshold, and the minimum-one expert is the best routable one.
    sd = sd + selection_mask_bias(sd).unsqueeze(0);
    mask = mask & (expert_active_.to(s.device()) != 0).unsqueeze(0);
  }
  auto top1 = std::get<1>(sd.max(1, true));  // [T, 1]
  return mask.scatter_(1, top1, true);
}

RoutingPlan ExpertChoiceRouterImpl::route(const torch::Tensor& x, const RouteContext& ctx) {
  auto logits = torch::matmul(x, weight.t());  // [T, E]
  auto s = torch::softmax(logits, 1);          // [T, E]
  torch::Tensor mask;                          // [T, E] bool
  const bool use_threshold = cfg_.expert_choice.mode == ECMode::kThreshold || ctx.generating ||
                             (!ctx.training && eval_routing_ == ECEval::kThreshold);
  if (use_threshold)
    mask = select_threshold(s);
  else if (cfg_.expert_choice.mode == ECMode::kNonCausal)
    mask = select_noncausal(s);
  else
    mask = select_causal(s, ctx.seq_len > 0 ? x.size(0) / ctx.seq_len : 1);
  // A pruned expert chooses no tokens (its capacity is not handed to the others: the rest route as before).
  if (!use_threshold && has_pruned()) mask = mask & (expert_active_.to(s.device()) != 0).unsqueeze(0);
  RoutingPlan plan = build_plan_from_mask(mask, s);
  // No balance loss: EC is balanced by construction (Zhou et al. 2022 section 3); the z-loss may stay.
  if (cfg_.z_loss_coef > 0) plan.aux_loss = cfg_.z_loss_coef * router_z_loss(logits);
  plan.scores = s.detach();
  return plan;
}

void ExpertChoiceRouterImpl::after_step(const RouteFeedback& fb) {
  if (fb.scores.empty()) return;
  torch::NoGradGuard ng;
  // The k_e-th largest score of each expert over the step's tokens: the score a token needs to be among
  // the CF/E share of tokens that expert takes. It is a statistic of batches already routed, so using it
  // later cannot leak.
  auto scores = fb.all_scores();  // [sum T_i, E]
  const int64_t T = scores.size(0);
  const int64_t k =
      std::min(std::max<int64_t>(ec_capacity(T, cfg_.expert_choice.capacity_factor, n_expert_), 1), T);
  auto kth = std::get<0>(scores.topk(k, 0)).select(0, k - 1).to(threshold.device(), threshold.dtype());
  if (threshold_steps.item<int64_t>() == 0)
    threshold.copy_(kth);  // the first step sets the thresholds (no bias towards the 1/E start)
  else
    threshold.mul_(cfg_.expert_choice.threshold_decay).add_(kth, 1.0 - cfg_.expert_choice.threshold_decay);
  threshold_steps.add_(1);
}

std::vector<std::string> ExpertChoiceRouterImpl::eval_routings() const {
  if (cfg_.expert_choice.mode == ECMode::kThreshold) return {};
  return {to_string(ECEval::kBatch), to_string(ECEval::kThreshold)};
}

void ExpertChoiceRouterImpl::set_eval_routing(const std::string& routing) {
  if (routing == to_string(ECEval::kBatch))
    eval_routing_ = ECEval::kBatch;
  else if (routing == to_string(ECEval::kThreshold))
    eval_routing_ = ECEval::kThreshold;
  else
    throw std::invalid_argument("expert_choice: unknown evaluation routing '" + routing +
                                "' (expected batch or threshold)");
}

torch::Tensor ExpertChoiceRouterImpl::assignment_scores(const torch::Tensor& x, const RoutingPlan& /*plan*/) {
  torch::NoGradGuard ng;
  return torch::softmax(torch::matmul(x, weight.t()), 1);
}

nlohmann::json ExpertChoiceRouterImpl::describe_state() const {
  auto j = Router::describe_state();
  auto t = threshold.to(torch::kCPU, torch::kDouble).contiguous();
  j["mode"] = to_string(cfg_.expert_choice.mode);
  j["eval_routing"] = to_string(eval_routing_);
  j["threshold"] = std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
  j["threshold_steps"] = threshold_steps.item<int64_t>();
  return j;
}

nlohmann::json ExpertChoiceRouterImpl::trace_fields(const RoutingPlan& plan, int64_t token,
                                                    const std::vector<int64_t>& experts) const {
  // Each chosen expert's calibrated threshold and the token's score for it (docs/serve.md, "Traces"):
  // threshold routing takes an expert whose score passes its threshold (generation always routes so).
  auto t = threshold.to(torch::kCPU, torch::kDouble).contiguous();
  std::vector<double> thresholds, scores;
  torch::Tensor s;
  if (plan.scores.defined()) s = plan.scores[token].to(torch::kCPU, torch::kDouble).contiguous();
  for (int64_t e : experts) {
    thresholds.push_back(t.data_ptr<double>()[e]);
    if (s.defined()) scores.push_back(s.data_ptr<double>()[e]);
  }
  return {
      {"thresholds", thresholds}, {"scores", scores}, {"threshold_steps", threshold_steps.item<int64_t>()}};
}

std::string to_string(ECMode v) {
  return v == ECMode::kCausal ? "causal" : v == ECMode::kNonCausal ? "noncausal" : "threshold";
}

std::string to_string(ECEval v) {
  return v == ECEval::kBatch ? "batch" : "threshold";
}

RouterSpec expert_choice_router_spec() {
  RouterSpec r;
  r.name = "expert_choice";
  r.summary =
      "expert choice: each expert takes its best tokens (Zhou et al. 2022; docs/routing.md section 2)";
  r.make = [](const MoEConfig& cfg, int64_t d_model) {
    return std::make_shared<ExpertChoiceRouterImpl>(cfg, d_model);
  };
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    auto& o = c->expert_choice;
    b.bind("moe.ec_capacity_factor", &o.capacity_factor);
    b.bind_enum(
        "moe.ec_mode", &o.mode,
        {{"causal", ECMode::kCausal}, {"noncausal", ECMode::kNonCausal}, {"threshold", ECMode::kThreshold}});
    b.bind_enum("moe.ec_eval", &o.eval, {{"batch", ECEval::kBatch}, {"threshold", ECEval::kThreshold}});
    b.bind("moe.ec_threshold_decay", &o.threshold_decay);
  };
  r.validate = [](const MoEConfig& c) {
    const auto& o = c.expert_choice;
    // CF <= E keeps k_e <= T: an expert cannot take more tokens than the batch (or a position group) has.
    if (!std::isfinite(o.capacity_factor) || o.capacity_factor <= 0 || o.capacity_factor > double(c.n_expert))
      throw ConfigError("moe.ec_capacity_factor",
                        "must be in (0, moe.n_expert], got " + std::to_string(o.capacity_factor));
    if (c.score != ScoreFunc::kSoftmax)
      throw ConfigError("moe.score", "expert_choice scores are a softmax over experts (Zhou et al. 2022)");
    option_checks::unit_decay("moe.ec_threshold_decay", o.threshold_decay);
  };
  r.equal_compute = [](MoEConfig& m) {
    // k_e = round(T * CF / E) tokens per expert, so T * CF assignments in all: CF = K per token (Zhou et
    // al. 2022 section 3: "capacity factor 2 matches the compute of top-2").
    m.expert_choice.capacity_factor = double(m.routed_used());
    return "capacity factor " + option_checks::str(m.routed_used());
  };
  return r;
}

}  // namespace moeforge
