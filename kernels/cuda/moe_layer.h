// A whole MoE layer (top-K softmax router + SwiGLU experts) on the GPU from raw device buffers, the
// computation of src/layer/fused_moe.cpp with the router in front:
//   logits = x Wr^T (cuBLAS, float32 out) -> fused top-K softmax -> counting sort by expert -> gather the
//   rows -> grouped GEMMs a = xs W_gate[e]^T, b = xs W_up[e]^T -> h = gate * silu(a) * b -> grouped GEMM
//   y_rows = h W_down[e]^T -> combine y[t] = sum_k y_rows[row of (t, k)]
// The gate is folded into the SwiGLU (as the CPU fused path), so the combine adds ungated rows.
//
// The one synchronisation: the grouped GEMMs take the expert sizes on the host (cuBLAS takes m, n, k from
// host arrays), so moe_route copies expert_offsets [E + 1] device -> host and waits for the stream once per
// forward, as MegaBlocks reads its host-side sizes. Everything else is asynchronous on `stream`; the
// backward reuses the host offsets of its forward and does not synchronise.
//
// No LibTorch and no CUDA include; `cublas` is a cublasHandle_t as void* (grouped_gemm.h: the calls set its
// stream and host pointer mode). Return codes as in types.h.
// Legend: T tokens, C model width, F expert hidden width, E experts, K choices per token, N = T * K rows.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/types.h"

namespace moeforge::kernels::cuda {

struct MoeConfig {
  int64_t T = 0, C = 0, F = 0, E = 0, K = 0;
  DType dtype = DType::kBFloat16;  // x, y, the weights and the row buffers; router math is float32
  bool renormalize = true;         // gates divided by the sum of the K chosen probabilities
  bool grouped_gemm = true;        // one cublasGemmGroupedBatchedEx per product when it applies, else a loop
  // true: combine by gathering each token's K rows (combine_rows: no atomics, bitwise reproducible);
  // false: scatter_add_gated with atomics (bf16: into a float32 buffer, then converted).
  bool deterministic_combine = true;
};

// Weights in nn.Linear's layout, all of cfg.dtype.
struct MoeWeights {
  const void* router = nullptr;  // [E, C]
  const void* w_gate = nullptr;  // [E, F, C]
  const void* w_up = nullptr;    // [E, F, C]
  const void* w_down = nullptr;  // [E, C, F]
};

// Buffers of one layer call, carved by moe_workspace_carve from one device allocation of
// moe_workspace_bytes(cfg) bytes (allocate once, reuse for every call of that shape). After moe_forward
// they hold the routing and the activations that moe_backward needs.
struct MoeWorkspace {
  float* logits = nullptr;               // [T, E]
  float* probs = nullptr;                // [T, E] the full softmax (for the Switch balance loss)
  float* topk_gate = nullptr;            // [T, K] gates, renormalised when cfg.renormalize
  int32_t* topk_id = nullptr;            // [T, K] chosen experts, descending probability
  int64_t* expert_offsets = nullptr;     // [E + 1] device
  int64_t* token_index = nullptr;        // [N] token of each row, rows grouped by expert
  int64_t* row_of_assignment = nullptr;  // [N] row of assignment t * K + k
  float* gate_rows = nullptr;            // [N] gate of each row
  void* sort_scratch = nullptr;          // expert_sort_scratch_bytes(N, E)
  void* gemm_ptrs = nullptr;             // grouped_gemm_scratch_bytes(E)
  void* rows_c1 = nullptr;               // [N, C] x rows; backward: dy rows, then x rows
  void* rows_c2 = nullptr;               // [N, C] expert output rows; backward: dx rows
  void* a = nullptr;                     // [N, F] gate projection (kept for the backward)
  void* b = nullptr;                     // [N, F] up projection (kept for the backward)
  void* f1 = nullptr;                    // [N, F] backward: dh, then da (in place)
  void* f2 = nullptr;                    // [N, F] h; backward: gate * h again, then db
  float* acc = nullptr;                  // [T, C] float32 accumulator of the atomic bf16 combine
  float* d_gate_rows = nullptr;          // [N] backward
  float* d_topk_gate = nullptr;          // [T, K] backward
  float* d_logits = nullptr;             // [T, E] backward
  void* d_logits_cast = nullptr;         // [T, E] of cfg.dtype, backward (the router GEMMs take one type)
  int64_t* host_offsets = nullptr;       // [E + 1] host memory from the caller (pinned: a cheaper copy)
};

// Whether cfg is a shape the driver takes: T >= 0, C, F >= 1, 1 <= E <= 256, 1 <= K <= min(E, 32),
// T * K < 2^31.
bool moe_config_ok(const MoeConfig& cfg);

// Device bytes of the workspace (each buffer 256-byte aligned); 0 for a config that is not ok.
size_t moe_workspace_bytes(const MoeConfig& cfg);

// Points ws's buffers into `device` (at least moe_workspace_bytes(cfg) bytes) and ws.host_offsets at
// `host_offsets` (E + 1 int64 of host memory). cudaErrorInvalidValue when something is missing or small.
int moe_workspace_carve(const MoeConfig& cfg, void* device, size_t bytes, int64_t* host_offsets,
                        MoeWorkspace* ws);

// Routing only: router GEMM, top-K softmax, counting sort, then the offsets to the host and the one
// stream synchronisation. Fills ws.logits .. ws.gate_rows and ws.host_offsets.
int moe_route(const MoeConfig& cfg, const MoeWeights& w, const void* x, MoeWorkspace& ws, void* cublas,
              void* stream);

// The experts and the combine on an already routed workspace: y [T, C] (written, of cfg.dtype).
int moe_experts_forward(const MoeConfig& cfg, const MoeWeights& w, const void* x, void* y, MoeWorkspace& ws,
                        void* cublas, void* stream);

// moe_route + moe_experts_forward: y = MoE(x), x and y [T, C] of cfg.dtype.
int moe_forward(const MoeConfig& cfg, const MoeWeights& w, const void* x, void* y, MoeWorkspace& ws,
                void* cublas, void* stream);

struct MoeGrads {
  void* dx = nullptr;                  // [T, C] of cfg.dtype, written
  void* d_router = nullptr;            // [E, C] of grad_dtype
  void* dw_gate = nullptr;             // [E, F, C] of grad_dtype
  void* dw_up = nullptr;               // [E, F, C] of grad_dtype
  void* dw_down = nullptr;             // [E, C, F] of grad_dtype
  DType grad_dtype = DType::kFloat32;  // float32 (any cfg.dtype) or bf16 (bf16 cfg.dtype only)
  bool accumulate = false;             // add into the weight gradients (beta = 1) instead of writing them
  const float* d_probs = nullptr;      // optional [T, E]: a gradient wrt ws.probs (e.g. the balance loss)
};

// Backward of moe_forward given dy [T, C] (cfg.dtype), on the workspace of that forward (same x, same
// weights): the expert path as FusedMoEFn::backward (src/layer/fused_moe.cpp: dh = dy_rows W_down,
// dW_down = dy_rows^T (gate h), SwiGLU backward to da, db and d_gate, dW_gate = da^T xs, dW_up = db^T xs,
// dx_rows = da W_gate + db W_up, combined per token), then the router: d_gate through the renormalisation
// and the softmax (topk_softmax_backward, plus g.d_probs) to d_logits, d_router = d_logits^T x and
// dx += d_logits Wr. For bf16, d_logits is rounded to bf16 for the two router GEMMs. The selection has no
// gradient. No host synchronisation.
int moe_backward(const MoeConfig& cfg, const MoeWeights& w, const void* x, const void* dy, const MoeGrads& g,
                 MoeWorkspace& ws, void* cublas, void* stream);

}  // namespace moeforge::kernels::cuda
