#include "moeforge/routing/bip.h"

#include "moeforge/config/binder.h"
#include "moeforge/routing/loss_free.h"
#include "option_checks.h"

namespace moeforge {

int64_t bip_capacity(int64_t n_tokens, int64_t k, int64_t n_expert) {
  return (n_tokens * k + n_expert - 1) / n_expert;
}

void bip_dual_iterations(torch::Tensor& q, const torch::Tensor& s, int64_t k, int64_t cap, int64_t n_iter) {
  torch::NoGradGuard ng;
  const int64_t T = s.size(0), E = s.size(1);
  auto sd = s.detach().to(q.dtype());  // [T, E]
  auto qd = q.to(sd.device());         // [E]
  // Tie rule (open in docs/routing.md section 4): each order statistic is taken as the midpoint between the
  // K-th and (K+1)-th (the cap-th and (cap+1)-th) largest, not the (K+1)-th itself. At the exact
  // (K+1)-th value, the token defining q_e sits in a tie with its own p_t, the top-K of (s - q) breaks it
  // arbitrarily and overfills the expert; with midpoints a fixed point has no ties, so its top-K of
  // (s - q) meets every capacity (measured: tests/test_bip.cpp reaches the GLPK optimum in <= 50
  // iterations where the (K+1)-th rule stalls 1-2 tokens over capacity).
  auto mid_kth = [](const torch::Tensor& a, int64_t kth_smallest, int64_t dim) {
    return 0.5 *
           (std::get<0>(a.kthvalue(kth_smallest, dim)) + std::get<0>(a.kthvalue(kth_smallest + 1, dim)));
  };
  for (int64_t it = 0; it < n_iter; ++it) {
    // Between the (K+1)-th and K-th largest over e = the (E-K)-th and (E-K+1)-th smallest; with K = E
    // every expert is taken, p = 0.
    torch::Tensor p = torch::zeros({T}, sd.options());  // [T]
    if (k < E) p = mid_kth(sd - qd.unsqueeze(0), E - k, 1).clamp_min(0);
    // Between the (cap+1)-th and cap-th largest over t; with cap >= T no expert is ever full.
    if (cap < T)
      qd = mid_kth(sd - p.unsqueeze(1), T - cap, 0).clamp_min(0);  // [E]
    else
      qd = torch::zeros({E}, sd.options());
  }
  q.copy_(qd.to(q.device()));
}

BipRouterImpl::BipRouterImpl(const MoEConfig& cfg, int64_t d_model)
    : TopKRouterImpl(without_balance_loss(cfg), d_model), mode_(cfg.bip.mode), n_iter_(cfg.bip.iters) {
  q = register_buffer("q", torch::zeros({n_expert()}));
}

RoutingPlan BipRouterImpl::route(const torch::Tensor& x, const RouteContext& ctx) {
  TokenScores s = score(x, ctx.training);
  const int64_t T = s.scores.size(0);
  const int64_t k = config().routed_used();
  torch::Tensor q_route = q;  // [E]
  if (mode_ == BipMode::kSolve) {
    // NON-CAUSAL: q is solved on the batch it routes, so a token's experts depend on the whole batch.
    // The stored q is only a warm start; route() leaves it as it is (no buffer changes in route()).
    q_route = q.clone();
    bip_dual_iterations(q_route, s.scores, k, bip_capacity(T, k, n_expert()), n_iter_);
  }
  // Complementary slackness: x_te = 1 exactly for the top-K of (s_t - q); the gate is s, not s - q.
  RoutingPlan plan = route_scores(s, -q_route, ctx);
  plan.scores = s.scores.detach();
  return plan;
}

void BipRouterImpl::after_step(const RouteFeedback& fb) {
  // Causal: q moves only after the batch was routed with the previous q (as loss-free's bias does). In
  // solve mode the same iterations keep the warm start that route() begins from.
  if (fb.scores.empty()) return;
  auto scores = fb.all_scores();  // [sum T_i, E]
  const int64_t T = scores.size(0);
  const int64_t k = config().routed_used();
  bip_dual_iterations(q, scores, k, bip_capacity(T, k, n_expert()), n_iter_);
}

std::string BipRouterImpl::top_k_obstacle() const {
  if (mode_ != BipMode::kCausal)
    return "moe.bip_mode: mode 'solve' routes each token by a dual solved on its whole batch";
  auto why = TopKRouterImpl::top_k_obstacle();
  if (why.empty() && q.abs().max().item<double>() != 0.0)
    why =
        "moe.router: experts are selected by top-K of scores minus a nonzero dual q, which only a zero one "
        "reduces to plain top-K";
  return why;
}

nlohmann::json BipRouterImpl::describe_state() const {
  auto j = TopKRouterImpl::describe_state();
  auto qc = q.to(torch::kCPU, torch::kDouble).contiguous();
  j["q"] = std::vector<double>(qc.data_ptr<double>(), qc.data_ptr<double>() + qc.numel());
  return j;
}

nlohmann::json BipRouterImpl::trace_fields(const RoutingPlan& /*plan*/, int64_t /*token*/,
                                           const std::vector<int64_t>& experts) const {
  // The dual q each chosen expert's score had subtracted for its selection (docs/serve.md, "Traces").
  auto qc = q.to(torch::kCPU, torch::kDouble).contiguous();
  std::vector<double> out;
  for (int64_t e : experts) out.push_back(qc.data_ptr<double>()[e]);
  return {{"dual", out}};
}

std::string to_string(BipMode v) {
  return v == BipMode::kCausal ? "causal" : "solve";
}

RouterSpec bip_router_spec() {
  RouterSpec r;
  r.name = "bip";
  r.summary = "BIP balancing: top-K of s - q, q the LP dual of the balanced assignment (Sun 2025; section 4)";
  r.make = [](const MoEConfig& cfg, int64_t d_model) {
    return std::make_shared<BipRouterImpl>(cfg, d_model);
  };
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    b.bind("moe.bip_iters", &c->bip.iters);
    b.bind_enum("moe.bip_mode", &c->bip.mode, {{"causal", BipMode::kCausal}, {"solve", BipMode::kSolve}});
  };
  r.validate = [](const MoEConfig& c) {
    if (c.bip.iters < 1)
      throw ConfigError("moe.bip_iters", "must be >= 1, got " + option_checks::str(c.bip.iters));
  };
  r.equal_compute = option_checks::same_k;
  return r;
}

}  // namespace moeforge
