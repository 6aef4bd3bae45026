// Loss-free balancing (Wang et al. 2024, arXiv 2408.15664; docs/routing.md section 3): token-choice top-K
// whose selection adds a per-expert bias b, moved after each step against the load just seen.
#pragma once

#include "moeforge/routing/topk.h"

namespace moeforge {

class LossFreeRouterImpl : public TopKRouterImpl {
 public:
  // The balance-loss terms of cfg are dropped (balancing without an aux-loss gradient is the point of
  // the method, Wang et al. section 3); the z-loss stays.
  LossFreeRouterImpl(const MoEConfig& cfg, int64_t d_model);

  // Selection: top-K of (s + b) with the b of the previous steps; gates from s alone.
  RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) override;
  // b_e += u * sign(mean(c) - c_e), c = the load of the step just trained (all its micro-batches; Wang
  // et al. Algorithm 1).
  void after_step(const RouteFeedback& feedback) override;
  std::string name() const override { return "loss_free"; }
  nlohmann::json describe_state() const override;
  nlohmann::json trace_fields(const RoutingPlan& plan, int64_t token,
                              const std::vector<int64_t>& experts) const override;  // the bias of its experts
  // Top-K only while the bias is zero: a nonzero one changes the selection.
  std::string top_k_obstacle() const override;

  torch::Tensor bias;  // [E] buffer, no gradient, init 0

 private:
  double update_rate_;
};
TORCH_MODULE(LossFreeRouter);

// cfg without the balance-loss terms (loss-free and BIP balance through their selection bias instead).
MoEConfig without_balance_loss(MoEConfig cfg);

// Its registry row: "loss_free", moe.bias_update_rate (loss_free_options.h).
RouterSpec loss_free_router_spec();

}  // namespace moeforge
