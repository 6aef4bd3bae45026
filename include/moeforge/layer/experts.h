// Stage 3 of the MoE layer: E feed-forward experts applied to rows already grouped by expert.
//
// Legend: N rows (assignments), C model width, F expert hidden width, E experts.
// Weights use nn.Linear's layout, stacked over experts:
//   SwiGLU: y = W_down (silu(W_gate x) * (W_up x)),  w_gate, w_up [E, F, C], w_down [E, C, F]
//   GELU:   y = W_down gelu(W_up x),                   w_up [E, F, C], w_down [E, C, F]
#pragma once

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "moeforge/layer/workspace.h"
#include "moeforge/routing/moe_config.h"

namespace moeforge {

struct ExpertWeights {
  ExpertAct act = ExpertAct::kSwiGLU;
  torch::Tensor w_gate;  // [E, F, C] (SwiGLU only)
  torch::Tensor w_up;    // [E, F, C]
  torch::Tensor w_down;  // [E, C, F]
};

// The plain reference: one (index-free) matmul chain per expert in a loop; autograd does the backward.
// This is the oracle every fast path is tested against. x_sorted [N, C], offsets [E+1] -> [N, C].
torch::Tensor experts_reference(const torch::Tensor& x_sorted, const std::vector<int64_t>& offsets,
                                const ExpertWeights& w);

// The grouped implementation: one autograd function for all experts, GEMMs written into slices of one
// buffer (groups of a few rows through the small-GEMM kernel, in parallel over experts), SwiGLU as one
// fused kernel pass, and a hand-written backward that keeps only the pre-activations. Same results as
// experts_reference. ws (optional) supplies reused scratch buffers and must outlive the backward pass.
torch::Tensor experts_grouped(const torch::Tensor& x_sorted, const std::vector<int64_t>& offsets,
                              const ExpertWeights& w, Workspace* ws = nullptr);

class ExpertsImpl : public torch::nn::Module {
 public:
  ExpertsImpl(int64_t n_expert, int64_t d_model, int64_t d_ff, ExpertAct act, ExpertsImplKind impl);
  torch::Tensor forward(const torch::Tensor& x_sorted, const std::vector<int64_t>& offsets);
  ExpertWeights weights() const { return {act_, w_gate, w_up, w_down}; }
  ExpertsImplKind impl() const { return impl_; }
  void set_impl(ExpertsImplKind impl) { impl_ = impl; }
  // Scratch buffers reused from call to call (not state: never saved, may be cleared at any time).
  Workspace& workspace() { return *workspace_; }

  torch::Tensor w_gate, w_up, w_down;

 private:
  ExpertAct act_;
  ExpertsImplKind impl_;
  std::shared_ptr<Workspace> workspace_ = std::make_shared<Workspace>();
};
TORCH_MODULE(Experts);

// A dense FFN of the same form (shared experts, dense layers): x [T, C] -> [T, C].
class DenseFFNImpl : public torch::nn::Module {
 public:
  DenseFFNImpl(int64_t d_model, int64_t d_ff, ExpertAct act);
  torch::Tensor forward(const torch::Tensor& x);

  torch::Tensor w_gate, w_up, w_down;  // [F, C], [F, C], [C, F]

 private:
  ExpertAct act_;
};
TORCH_MODULE(DenseFFN);

}  // namespace moeforge
