// Dispatch -> experts -> combine as one autograd function (the fast path of MoELayer on CPU; SwiGLU and
// GELU experts).
// Its plain twin is moe_plain_loop (moe_layer.h), with the same signature and results.
//
// Legend: T tokens, C model width, F expert hidden width, E experts, N assignments.
// What it does, after MegaBlocks/ScatterMoE: rows are gathered straight into the expert GEMMs' input in
// expert order, the gate is folded into the fused activation pass, the output rows are scatter-added back to
// their tokens; backward keeps only the pre-activations [N, F] (two for SwiGLU, one for GELU; x is
// re-gathered, h recomputed), and the gate gradient <dy[token], y_row> is taken as <dh, act(a)> inside the
// fused backward pass, so the expert output rows need not be kept. All intermediates live in a per-layer
// Workspace. Weight gradients are added straight into existing .grad tensors (gradient-accumulation fusion,
// as Megatron does) when a plain backward() runs; see fusable_grad in src/layer/grouped_ops.h.
#pragma once

#include <torch/torch.h>

#include "moeforge/layer/experts.h"
#include "moeforge/layer/workspace.h"
#include "moeforge/routing/router.h"

namespace moeforge {

// Per-expert health of the expert outputs (reliability tracking, ClusterMoE): RMS over an expert's output
// rows of the row RMS, as float64 [E] (0 for an idle expert), and the count of rows with a NaN or Inf,
// as int64 [E]. Taken from the ungated expert outputs.
struct ExpertHealth {
  torch::Tensor out_rms, nonfinite;
};

// Whether fused_moe can run x with these weights (CPU, float or double, weights of x's dtype).
bool fused_moe_supported(const torch::Tensor& x, const ExpertWeights& w);

// x [T, C] -> y [T, C], y[t] = sum over assignments i of t of gate[i] * expert_{e(i)}(x[t]);
// differentiable in x, plan.gate and the weights. ws may be null (fresh buffers every call); if given, it
// must outlive the backward pass of the result. With `health`, the expert outputs are kept ungated until
// the scatter (same cost) and their health is measured on the way.
torch::Tensor fused_moe(const torch::Tensor& x, const RoutingPlan& plan, const ExpertWeights& w,
                        Workspace* ws = nullptr, ExpertHealth* health = nullptr);

// How many weight gradients the grouped experts and fused_moe have added straight into an existing .grad
// since the process started (gradient-accumulation fusion); for tests and the bench.
int64_t fused_grad_accumulations();

}  // namespace moeforge
