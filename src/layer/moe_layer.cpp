#include "moeforge/layer/moe_layer.h"

#include "grouped_ops.h"
#include "moeforge/dist/dist.h"
#include "moeforge/layer/dispatch.h"
#include "moeforge/layer/fused_moe.h"
#include "moeforge/layer/precision.h"
#include "moeforge/routing/factory.h"

namespace moeforge {

namespace {

// Per-expert RMS of output rows and count of rows with a NaN/Inf: the health signal of reliability tracking,
// for the paths that do not measure it inside fused_moe.
ExpertHealth measure_expert_health(const torch::Tensor& y_sorted, const RoutingPlan& plan) {
  const auto off = plan.offsets();
  auto y = y_sorted.detach().to(torch::kCPU).contiguous();  // [N, C]
  detail::HealthSums sums(off);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "expert_health",
                                  [&] { sums.add<scalar_t>(y, off); });
  return sums.result();
}

// Rows [off[e], off[e+1]) of the expert-sorted output times `factor` (the injected fault), through autograd.
torch::Tensor apply_fault(const torch::Tensor& y_sorted, const RoutingPlan& plan, int64_t e, double factor) {
  const auto off = plan.offsets();
  const int64_t n = off[e + 1] - off[e];
  if (n == 0) return y_sorted;
  auto scale = torch::ones({y_sorted.size(0), 1}, y_sorted.options());
  scale.narrow(0, off[e], n).fill_(factor);
  return y_sorted * scale;
}

}  // namespace

void MoELayerImpl::set_fault(int64_t expert, double factor) {
  TORCH_CHECK(expert >= 0 && expert < cfg_.routed_experts(), "MoELayer::set_fault: expert ", expert,
              " is not one of the ", cfg_.routed_experts(), " routed experts");
  fault_expert_ = expert;
  fault_factor_ = factor;
}

MoELayerImpl::MoELayerImpl(const MoEConfig& cfg, int64_t d_model) : cfg_(cfg) {
  router = register_module("router", make_router(cfg_, d_model));
  if (cfg_.expert_form == ExpertForm::kAdapter) {
    dense = register_module("dense", DenseFFN(d_model, cfg_.d_expert, cfg_.expert_act));
    // Frozen (sparse upcycling): only adapters and router train. Still a parameter, so checkpoints keep it.
    for (auto& p : dense->parameters()) p.set_requires_grad(false);
    adapters = register_module(
        "adapters", AdapterExperts(cfg_.routed_experts(), d_model, cfg_.adapter_dim, cfg_.adapter_scale));
  } else {
    experts = register_module("experts", Experts(cfg_.routed_experts(), d_model, cfg_.routed_width(),
                                                 cfg_.expert_act, cfg_.experts_impl));
    if (dist::experts_sharded()) {
      // Expert parallelism (the trainer built expert groups of dist.expert_parallel ranks): all experts are
      // initialised as in one process (the same random numbers, so the rest of the model too), then this rank
      // keeps its shard.
      sharded_ = true;
      shard_ = dist::expert_shard(cfg_.routed_experts(), dist::group_rank(dist::Group::kExperts),
                                  dist::group_size(dist::Group::kExperts));
      torch::NoGradGuard ng;
      for (auto* w : {&experts->w_gate, &experts->w_up, &experts->w_down})
        if (w->defined()) w->set_data(w->narrow(0, shard_.first, shard_.count).clone());
    }
  }
  if (cfg_.n_shared_expert > 0)
    shared =
        register_module("shared", DenseFFN(d_model, cfg_.n_shared_expert * cfg_.d_expert, cfg_.expert_act));
  if (cfg_.shared_gate) shared_gate = register_parameter("shared_gate", torch::randn({1, d_model}) * 0.02);
}

MoEOutput MoELayerImpl::forward(const torch::Tensor& x, RouteContext ctx) {
  const auto shape = x.sizes().vec();
  const int64_t C = shape.back();
  if (x.dim() == 3) {
    ctx.n_seq = shape[0];
    ctx.seq_len = shape[1];
  }
  ctx.training = ctx.training || is_training();
  auto x2 = x.reshape({-1, C});  // [T, C]
  const int64_t T = x2.size(0);

  RoutingPlan plan;
  {
    RECORD_USER_SCOPE("moeforge::routing");  // profiling scope (src/model/transformer.cpp)
    plan = router->route(x2, ctx);
  }
  RECORD_USER_SCOPE("moeforge::experts");
  if (record_input_) last_input_ = x2.detach();
  // Expert health is measured only where a state update will read it (training, routers that ask).
  const bool want_health = ctx.training && router->wants_expert_health();
  ExpertHealth health;
  torch::Tensor y;  // [T, C] routed output
  if (adapters) {
    // Adapter form: the experts' input rows are the frozen FFN's output z, not x, and z is added back.
    auto z = dense->forward(x2);                                  // [T, C]
    auto z_sorted = dispatch(z, plan);                            // [N, C]
    auto a_sorted = adapters->forward(z_sorted, plan.offsets());  // [N, C]
    if (fault_expert_ >= 0) a_sorted = apply_fault(a_sorted, plan, fault_expert_, fault_factor_);
    if (want_health) health = measure_expert_health(a_sorted, plan);
    y = z + combine(a_sorted, plan, T);
  } else if (sharded_) {
    // Expert parallelism (docs/distributed.md): the rows travel to the ranks that own their experts and
    // back between the local stages; the fused path, which needs every expert here, is not used.
    auto x_sorted = dispatch(x2, plan);  // [N, C] this rank's assignments
    auto ex = dist::plan_exchange(plan.offsets(), cfg_.routed_experts());
    auto x_local = dist::dispatch_exchange(x_sorted, ex);        // [M, C] rows for this rank's experts
    auto y_local = experts->forward(x_local, ex.local_offsets);  // [M, C]
    auto y_sorted = dist::combine_exchange(y_local, ex);         // [N, C] back in plan order
    if (fault_expert_ >= 0) y_sorted = apply_fault(y_sorted, plan, fault_expert_, fault_factor_);
    if (want_health) health = measure_expert_health(y_sorted, plan);
    y = combine(y_sorted, plan, T);
  } else if (fault_expert_ < 0 && experts->impl() == ExpertsImplKind::kGrouped &&
             fused_moe_supported(x2, experts->weights())) {
    // The fast path: dispatch, experts and combine in one function (fused_moe.h).
    y = fused_moe(x2, plan, experts->weights(), &experts->workspace(), want_health ? &health : nullptr);
  } else {
    auto x_sorted = dispatch(x2, plan);                          // [N, C]
    auto y_sorted = experts->forward(x_sorted, plan.offsets());  // [N, C]
    if (fault_expert_ >= 0) y_sorted = apply_fault(y_sorted, plan, fault_expert_, fault_factor_);
    if (want_health) health = measure_expert_health(y_sorted, plan);
    y = combine(y_sorted, plan, T);
  }
  // A router's per-token output scale (ClusterMoE's adaptive weight a(x)) scales the routed output only;
  // shared experts are outside the router's control.
  if (plan.token_scale.defined()) y = y * plan.token_scale.to(y.dtype()).unsqueeze(1);
  if (shared) {
    auto s = shared->forward(x2);
    if (shared_gate.defined()) s = s * torch::sigmoid(torch::matmul(x2, shared_gate.t()));  // [T, C] * [T, 1]
    y = y + s;
  }
  if (ctx.training) {
    // What this step teaches the router, summed over micro-batches until after_step (feedback.h).
    feedback_.add_plan(plan);
    if (want_health) feedback_.add_health(plan, health.out_rms, health.nonfinite);
    last_plan_ = plan;
  }
  return {y.reshape(shape), plan};
}

void MoELayerImpl::add_token_loss(const torch::Tensor& token_loss) {
  if (!last_plan_.expert_offsets.defined() || !token_loss.defined()) return;
  TORCH_CHECK(token_loss.numel() == last_plan_.stats.n_tokens,
              "MoELayer::add_token_loss: ", token_loss.numel(), " losses for the ", last_plan_.stats.n_tokens,
              " tokens of the last training forward");
  feedback_.add_token_loss(last_plan_, token_loss);
  last_plan_ = RoutingPlan();  // one loss per forward
}

void MoELayerImpl::after_step() {
  if (feedback_.empty()) return;
  // Data parallelism: the router learns from the global batch's feedback, the same on every rank (no-op
  // in one process; docs/distributed.md).
  globalize_feedback(feedback_);
  router->after_step(feedback_);
  feedback_.clear();
  last_plan_ = RoutingPlan();
}

torch::Tensor moe_plain_loop(const torch::Tensor& x, const RoutingPlan& plan, const ExpertWeights& w) {
  const auto off = plan.offsets();
  auto y = torch::zeros_like(x);  // [T, C]
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(off.size()); ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    auto idx = plan.token_index.narrow(0, off[e], n);  // [n]
    auto xs = x.index_select(0, idx);                  // [n, C]
    torch::Tensor h;
    if (w.act == ExpertAct::kSwiGLU)
      h = torch::silu(linear_mp(xs, w.w_gate[e])) * linear_mp(xs, w.w_up[e]);
    else
      h = torch::gelu(linear_mp(xs, w.w_up[e]));
    // Products in the precision in force (precision.h), as the fused path.
    auto ye = linear_mp(h, w.w_down[e]) * plan.gate.narrow(0, off[e], n).unsqueeze(1);
    y.index_add_(0, idx, ye);
  }
  return y;
}

LeakResult causal_leak(MoELayerImpl& layer, const torch::Tensor& x, const LeakOptions& opt) {
  return causal_leak([&](const torch::Tensor& xx) { return layer.forward(xx).y; }, x, opt);
}

}  // namespace moeforge
