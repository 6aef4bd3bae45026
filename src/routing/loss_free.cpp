#include "moeforge/routing/loss_free.h"

#include "moeforge/config/binder.h"
#include "option_checks.h"

namespace moeforge {

MoEConfig without_balance_loss(MoEConfig cfg) {
  cfg.balance_coef = 0;
  cfg.seq_balance_coef = 0;
  return cfg;
}

LossFreeRouterImpl::LossFreeRouterImpl(const MoEConfig& cfg, int64_t d_model)
    : TopKRouterImpl(without_balance_loss(cfg), d_model), update_rate_(cfg.loss_free.bias_update_rate) {
  bias = register_buffer("bias", torch::zeros({n_expert()}));
}

RoutingPlan LossFreeRouterImpl::route(const torch::Tensor& x, const RouteContext& ctx) {
  // The bias only holds loads of batches already trained on: routing a batch never sees its own load.
  return route_scores(score(x, ctx.training), bias, ctx);
}

void LossFreeRouterImpl::after_step(const RouteFeedback& fb) {
  const auto& c = fb.load;  // [E] the step's load, summed over its micro-batches
  if (c.empty()) return;
  double mean = 0;
  for (int64_t v : c) mean += double(v);
  mean /= double(c.size());
  auto step = torch::empty({int64_t(c.size())});  // [E] sign(mean(c) - c_e)
  for (size_t e = 0; e < c.size(); ++e) {
    const double d = mean - double(c[e]);
    step[e] = d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0);
  }
  torch::NoGradGuard ng;
  bias.add_(step.to(bias.device(), bias.dtype()), update_rate_);
}

std::string LossFreeRouterImpl::top_k_obstacle() const {
  auto why = TopKRouterImpl::top_k_obstacle();
  if (why.empty() && bias.abs().max().item<double>() != 0.0)
    why =
        "moe.router: experts are selected by top-K of scores plus a nonzero bias, which only a zero one "
        "reduces to plain top-K";
  return why;
}

nlohmann::json LossFreeRouterImpl::describe_state() const {
  auto j = TopKRouterImpl::describe_state();
  auto b = bias.to(torch::kCPU, torch::kDouble).contiguous();
  j["bias"] = std::vector<double>(b.data_ptr<double>(), b.data_ptr<double>() + b.numel());
  return j;
}

nlohmann::json LossFreeRouterImpl::trace_fields(const RoutingPlan& /*plan*/, int64_t /*token*/,
                                                const std::vector<int64_t>& experts) const {
  // The balancing bias each chosen expert's score had added for its selection (docs/serve.md, "Traces").
  auto b = bias.to(torch::kCPU, torch::kDouble).contiguous();
  std::vector<double> out;
  for (int64_t e : experts) out.push_back(b.data_ptr<double>()[e]);
  return {{"bias", out}};
}

RouterSpec loss_free_router_spec() {
  RouterSpec r;
  r.name = "loss_free";
  r.summary = "loss-free balancing: top-K of s + b, b stepped against the load (Wang et al. 2024; section 3)";
  r.make = [](const MoEConfig& cfg, int64_t d_model) {
    return std::make_shared<LossFreeRouterImpl>(cfg, d_model);
  };
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    b.bind("moe.bias_update_rate", &c->loss_free.bias_update_rate);
  };
  r.validate = [](const MoEConfig& c) {
    option_checks::nonneg("moe.bias_update_rate", c.loss_free.bias_update_rate);
  };
  r.equal_compute = option_checks::same_k;
  return r;
}

}  // namespace moeforge
