// The MoE layer: router -> dispatch -> experts -> combine (+ shared experts). It composes the four stages
// and nothing else; a model never knows which router it has.
//
// Legend: B sequences, S positions, T = B*S tokens, C model width, N assignments.
#pragma once

#include <torch/torch.h>

#include <memory>

#include "moeforge/dist/expert_parallel.h"
#include "moeforge/layer/adapter_experts.h"
#include "moeforge/layer/experts.h"
#include "moeforge/routing/measures.h"
#include "moeforge/routing/moe_config.h"
#include "moeforge/routing/router.h"

namespace moeforge {

struct MoEOutput {
  torch::Tensor y;  // same shape as x
  RoutingPlan plan;
};

class MoELayerImpl : public torch::nn::Module {
 public:
  MoELayerImpl(const MoEConfig& cfg, int64_t d_model);

  // x: [T, C] or [B, S, C]. For [B, S, C] input, ctx.n_seq / ctx.seq_len are filled in from the shape.
  MoEOutput forward(const torch::Tensor& x, RouteContext ctx = {});
  // Training forwards (ctx.training) add their plan and measured expert health to this layer's feedback
  // (routing/feedback.h). add_token_loss gives the per-token loss [T] of the last training forward, when the
  // caller has it (reliability tracking uses it); after_step, once after the optimiser step, hands the
  // whole step's feedback to the router and starts a new one. So n micro-batches of gradient accumulation
  // update the router as one batch of all their tokens would.
  void add_token_loss(const torch::Tensor& token_loss);
  void after_step();
  const RouteFeedback& feedback() const { return feedback_; }
  // Keep the router input [T, C] of the last forward (for measures that re-score it: the optimality gap).
  void set_record_input(bool on) { record_input_ = on; }
  const torch::Tensor& last_input() const { return last_input_; }
  // Fault injection (moeforge compare's reliability experiment, docs/comparison.md): every output row of
  // routed expert `expert` is multiplied by `factor` (NaN makes it NaN) before combine, in training and in
  // evaluation, until clear_fault(). Not saved in checkpoints: a fault is a property of the run.
  void set_fault(int64_t expert, double factor);
  void clear_fault() { fault_expert_ = -1; }
  int64_t fault_expert() const { return fault_expert_; }

  const MoEConfig& config() const { return cfg_; }
  // Expert parallelism (expert groups of more than one rank when the layer was built, dist.h
  // experts_sharded(); docs/distributed.md): `experts` holds only this rank's shard, and forward exchanges
  // rows with the other ranks.
  bool experts_sharded() const { return sharded_; }
  dist::ExpertShard expert_shard() const { return shard_; }
  std::shared_ptr<Router> router;
  Experts experts{nullptr};  // moe.expert_form = "ffn"
  // moe.expert_form = "adapter" (PESC adapters): a frozen dense FFN of width d_expert whose output feeds the
  // adapter experts and is added to their combined output (adapter_experts.h).
  DenseFFN dense{nullptr};
  AdapterExperts adapters{nullptr};
  DenseFFN shared{nullptr};   // K_s shared experts merged into one FFN of width K_s * F (same function)
  torch::Tensor shared_gate;  // [1, C] with moe.shared_gate: shared output * sigmoid(x . w) (Qwen2-MoE)

 private:
  MoEConfig cfg_;
  RouteFeedback feedback_;
  RoutingPlan last_plan_;  // the last training forward's, until its token loss arrives
  bool record_input_ = false;
  bool sharded_ = false;
  dist::ExpertShard shard_;
  torch::Tensor last_input_;
  int64_t fault_expert_ = -1;
  double fault_factor_ = 1.0;
};
TORCH_MODULE(MoELayer);

// The whole layer the way most PyTorch MoE code writes it (the bench's "plain loop"): per expert,
// index_select its tokens, run the FFN, index_add the gated result. Same result as MoELayer's experts.
torch::Tensor moe_plain_loop(const torch::Tensor& x, const RoutingPlan& plan, const ExpertWeights& w);

// The causal leak measure (routing/measures.h, docs/routing.md section 9) of an MoE layer's output y, in the
// layer's current train/eval mode.
LeakResult causal_leak(MoELayerImpl& layer, const torch::Tensor& x, const LeakOptions& opt = {});

}  // namespace moeforge
