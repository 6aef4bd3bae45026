// Stage 1 of the MoE layer (DESIGN.md "four stages"): the router contract.
//
// Legend: T tokens (B sequences of S positions), C model width, E routed experts, K experts per token,
// N assignments kept (varies by router; a token may have 0..E of them).
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "moeforge/routing/stats.h"

namespace moeforge {

// What some routers need beyond x.
struct RouteContext {
  int64_t n_seq = 1;          // B
  int64_t seq_len = 0;        // S (0: the whole batch is one sequence, S = T)
  torch::Tensor seq_cluster;  // [B] int64 cluster id per sequence (MoCE), optional
  torch::Tensor seq_domain;   // [B] int64 domain label per sequence (measures only), optional
  bool training = false;
  int64_t step = 0;
};

// The result of routing one batch: assignments grouped by expert.
struct RoutingPlan {
  torch::Tensor token_index;     // [N] int64: token of each assignment, grouped by expert, ascending inside
  torch::Tensor expert_offsets;  // [E+1] int64 on CPU: assignments of expert e are [off[e], off[e+1])
  torch::Tensor gate;            // [N] float: differentiable gate weight g >= 0
  torch::Tensor aux_loss;        // scalar: the router's auxiliary loss (zero if none, and zero from the
                           // token-choice routers in inference: not training, grad mode off), differentiable
  RoutingStats stats;

  // Optional, router-specific.
  torch::Tensor scores;       // [T, E] detached router scores, for after_step updates that need them (BIP)
  torch::Tensor seq_cluster;  // [B] int64 the cluster each sequence was routed in (MoCE), for later layers
  // [T] float, differentiable: a per-token scale of the routed output that MoELayer's combine step applies
  // (ClusterMoE's adaptive routing weight a(x) = sigmoid(w.x)); undefined = 1.
  torch::Tensor token_scale;
  // Filled by MoELayer after the experts ran, when router->wants_expert_health():
  torch::Tensor expert_out_rms;    // [E] float64 RMS of each expert's output rows (0 for an idle expert)
  torch::Tensor expert_nonfinite;  // [E] int64 output rows with a NaN or Inf
  // Filled by the trainer before after_step, when it has them:
  torch::Tensor token_loss;  // [T] per-token training loss of the batch that was routed

  int64_t n_expert() const { return expert_offsets.numel() - 1; }
  int64_t n_assign() const { return token_index.numel(); }
  std::vector<int64_t> offsets() const;  // expert_offsets as a vector
};

// Every router implements this; a model only ever sees a Router. Router state that must survive a
// checkpoint (loss-free bias, BIP dual, reliabilities, centroids, EC thresholds) is held in registered
// buffers (register_buffer), so that saving named_parameters() and named_buffers() saves all of it.
class Router : public torch::nn::Module {
 public:
  // x: [T, C] the FFN input after its norm.
  virtual RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) = 0;
  // Called once after the optimiser step with the plan of the batch just trained on (loss-free bias,
  // BIP dual, reliabilities, online centroids). The default keeps no state.
  virtual void after_step(const RoutingPlan& /*plan*/) {}
  // Routers that track expert health (reliability) ask MoELayer to fill expert_out_rms/expert_nonfinite.
  virtual bool wants_expert_health() const { return false; }
  virtual int64_t n_expert() const = 0;
  virtual std::string name() const = 0;

  // Pruning (ROUTING.md section 5): active [E], 1 = routable, 0 = removed from routing. A pruned expert gets
  // no assignment; only the *selection* is masked, the scores are not, so the gates of the other experts
  // are unchanged and pruning an expert that no token chose leaves the layer's output unchanged. The mask
  // is the buffer "expert_active", so a pruned checkpoint keeps it. Throws std::invalid_argument (naming
  // the layer's router) when the shape is wrong or too few experts would remain to route a token.
  virtual void set_expert_mask(const torch::Tensor& active);
  virtual torch::Tensor expert_mask() const;  // [E] float on CPU, 1 = routable
  std::vector<int64_t> pruned_experts() const;

 protected:
  // Registers the [E] "expert_active" buffer (all ones); every router but the hierarchical one (which has
  // its own, with the same name) calls it in its constructor.
  void register_expert_mask(int64_t n_expert);
  // The fewest routable experts this router needs (top-K needs K). Used by the default set_expert_mask.
  virtual int64_t min_active_experts() const { return 1; }
  bool has_pruned() const;  // any expert masked out
  // [E] additive selection bias on `like`'s device and dtype: 0 for a routable expert, -inf for a pruned one.
  torch::Tensor selection_mask_bias(const torch::Tensor& like) const;
  torch::Tensor expert_active_;  // [E] buffer
};

// Makes a plan from per-token choices.
//   expert [T, K] int64 (CPU), rank order = priority order (column 0 = first choice)
//   keep   [T, K] bool (CPU): the choice is requested (false = not asked for, e.g. GShard random drop)
//   priority [T] float (CPU), optional: if defined, tokens inside one rank are served by descending
//            priority (Switch batch-prioritised routing); otherwise in token order
//   gate_tk [T, K] float: differentiable gate of each choice
//   capacity: max assignments per expert, <= 0 for none (dropless)
// Assignments are grouped by expert with a counting sort, in ascending token order within an expert.
RoutingPlan build_plan_from_choices(const torch::Tensor& expert, const torch::Tensor& keep,
                                    const torch::Tensor& priority, const torch::Tensor& gate_tk,
                                    int64_t n_expert, int64_t capacity);

// cap = ceil(CF * T * K / E), ROUTING.md section 1; 0 when CF = 0 (dropless).
int64_t expert_capacity(double capacity_factor, int64_t n_tokens, int64_t k, int64_t n_expert);

}  // namespace moeforge
