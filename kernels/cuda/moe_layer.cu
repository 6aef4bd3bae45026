// Host-side driver of the CUDA MoE layer: launches only, no kernels of its own (moe_layer.h).
#include <cuda_runtime.h>

#include <type_traits>

#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/moe_layer.h"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/routing.h"

namespace moeforge::kernels::cuda {
namespace {

constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);

// Calls f with a value of the storage type of t (float or bf16) as a tag.
template <typename Fn>
int dispatch(DType t, Fn&& f) {
  return t == DType::kFloat32 ? f(float{}) : f(bf16{});
}

#define MOE_TRY(expr)                       \
  do {                                      \
    if (const int rc_ = (expr)) return rc_; \
  } while (0)

// Lays buffers out one after the other, each 256-byte aligned; with base == nullptr it only measures.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* take(int64_t n, int64_t elt = static_cast<int64_t>(sizeof(T))) {
    off_ = (off_ + 255) / 256 * 256;
    T* p = base_ ? reinterpret_cast<T*>(base_ + off_) : nullptr;
    off_ += static_cast<size_t>(n * elt);
    return p;
  }
  size_t size() const { return off_; }

 private:
  char* base_;
  size_t off_ = 0;
};

MoeWorkspace carve(const MoeConfig& cfg, char* base, size_t* bytes) {
  const int64_t T = cfg.T, C = cfg.C, F = cfg.F, E = cfg.E, K = cfg.K, N = T * K, el = dtype_size(cfg.dtype);
  Carver c(base);
  MoeWorkspace ws;
  ws.logits = c.take<float>(T * E);
  ws.probs = c.take<float>(T * E);
  ws.topk_gate = c.take<float>(T * K);
  ws.topk_id = c.take<int32_t>(T * K);
  ws.expert_offsets = c.take<int64_t>(E + 1);
  ws.token_index = c.take<int64_t>(N);
  ws.row_of_assignment = c.take<int64_t>(N);
  ws.gate_rows = c.take<float>(N);
  ws.sort_scratch = c.take<char>(static_cast<int64_t>(expert_sort_scratch_bytes(N, E)));
  ws.gemm_ptrs = c.take<char>(static_cast<int64_t>(grouped_gemm_scratch_bytes(E)));
  ws.rows_c1 = c.take<char>(N * C, el);
  ws.rows_c2 = c.take<char>(N * C, el);
  ws.a = c.take<char>(N * F, el);
  ws.b = c.take<char>(N * F, el);
  ws.f1 = c.take<char>(N * F, el);
  ws.f2 = c.take<char>(N * F, el);
  ws.acc = c.take<float>(cfg.dtype == DType::kFloat32 ? 0 : T * C);
  ws.d_gate_rows = c.take<float>(N);
  ws.d_topk_gate = c.take<float>(T * K);
  ws.d_logits = c.take<float>(T * E);
  ws.d_logits_cast = c.take<char>(T * E, el);
  *bytes = c.size();
  return ws;
}

// y [T, C] = the combine of the rows [N, C] (moe_layer.h, MoeConfig::deterministic_combine).
int combine(const MoeConfig& cfg, void* y, const void* rows, const MoeWorkspace& ws, void* stream) {
  const int64_t T = cfg.T, C = cfg.C, K = cfg.K;
  return dispatch(cfg.dtype, [&](auto tag) -> int {
    using S = decltype(tag);
    if (cfg.deterministic_combine)
      return combine_rows(static_cast<S*>(y), static_cast<const S*>(rows), ws.row_of_assignment, nullptr, T,
                          K, C, stream);
    const auto s = static_cast<cudaStream_t>(stream);
    if constexpr (std::is_same_v<S, float>) {
      MOE_TRY(static_cast<int>(cudaMemsetAsync(y, 0, sizeof(float) * T * C, s)));
      return scatter_add_gated(static_cast<float*>(y), static_cast<const float*>(rows), ws.token_index,
                               nullptr, T * K, C, stream);
    } else {
      MOE_TRY(static_cast<int>(cudaMemsetAsync(ws.acc, 0, sizeof(float) * T * C, s)));
      MOE_TRY(scatter_add_gated(ws.acc, static_cast<const bf16*>(rows), ws.token_index, nullptr, T * K, C,
                                stream));
      return convert(static_cast<bf16*>(y), ws.acc, T * C, stream);
    }
  });
}

}  // namespace

bool moe_config_ok(const MoeConfig& cfg) {
  return cfg.T >= 0 && cfg.C >= 1 && cfg.F >= 1 && cfg.E >= 1 && cfg.E <= kTopKMaxExperts && cfg.K >= 1 &&
         cfg.K <= cfg.E && cfg.K <= kTopKMaxK && cfg.T * cfg.K < (int64_t{1} << 31);
}

size_t moe_workspace_bytes(const MoeConfig& cfg) {
  if (!moe_config_ok(cfg)) return 0;
  size_t bytes = 0;
  carve(cfg, nullptr, &bytes);
  return bytes;
}

int moe_workspace_carve(const MoeConfig& cfg, void* device, size_t bytes, int64_t* host_offsets,
                        MoeWorkspace* ws) {
  if (!moe_config_ok(cfg) || ws == nullptr || device == nullptr || host_offsets == nullptr ||
      reinterpret_cast<uintptr_t>(device) % 256 != 0)
    return kInvalid;
  size_t need = 0;
  MoeWorkspace w = carve(cfg, static_cast<char*>(device), &need);
  if (bytes < need) return kInvalid;
  w.host_offsets = host_offsets;
  *ws = w;
  return 0;
}

int moe_route(const MoeConfig& cfg, const MoeWeights& w, const void* x, MoeWorkspace& ws, void* cublas,
              void* stream) {
  if (!moe_config_ok(cfg) || ws.host_offsets == nullptr) return kInvalid;
  const int64_t T = cfg.T, C = cfg.C, E = cfg.E, K = cfg.K;
  const auto s = static_cast<cudaStream_t>(stream);
  if (T > 0) {
    // logits [T, E] = x [T, C] @ Wr [E, C]^T, float32 out for either input type.
    MOE_TRY(gemm(cublas, cfg.dtype, DType::kFloat32, false, true, T, E, C, x, w.router, ws.logits, false,
                 stream));
    MOE_TRY(topk_softmax(ws.probs, ws.topk_gate, ws.topk_id, ws.logits, T, E, K, cfg.renormalize, stream));
  }
  MOE_TRY(expert_counting_sort(ws.expert_offsets, ws.token_index, ws.row_of_assignment, ws.gate_rows,
                               ws.topk_id, ws.topk_gate, T, K, E, ws.sort_scratch, stream));
  // The one synchronisation of the forward: the grouped GEMMs need the expert sizes on the host.
  MOE_TRY(static_cast<int>(cudaMemcpyAsync(ws.host_offsets, ws.expert_offsets, sizeof(int64_t) * (E + 1),
                                           cudaMemcpyDeviceToHost, s)));
  MOE_TRY(static_cast<int>(cudaStreamSynchronize(s)));
  // The router never chooses an id outside [0, E), so every assignment has a row.
  if (ws.host_offsets[E] != T * K) return static_cast<int>(cudaErrorUnknown);
  return 0;
}

int moe_experts_forward(const MoeConfig& cfg, const MoeWeights& w, const void* x, void* y, MoeWorkspace& ws,
                        void* cublas, void* stream) {
  if (!moe_config_ok(cfg) || ws.host_offsets == nullptr) return kInvalid;
  const int64_t T = cfg.T, C = cfg.C, F = cfg.F, E = cfg.E, N = T * cfg.K;
  if (T == 0) return 0;
  const int64_t* off = ws.host_offsets;
  void* ptrs = cfg.grouped_gemm ? ws.gemm_ptrs : nullptr;
  const DType dt = cfg.dtype;
  MOE_TRY(dispatch(dt, [&](auto tag) -> int {
    using S = decltype(tag);
    return gather_rows(static_cast<S*>(ws.rows_c1), static_cast<const S*>(x), ws.token_index, N, C, stream);
  }));
  MOE_TRY(grouped_mm_nt(cublas, dt, ws.a, ws.rows_c1, w.w_gate, off, E, F, C, false, ptrs, stream));
  MOE_TRY(grouped_mm_nt(cublas, dt, ws.b, ws.rows_c1, w.w_up, off, E, F, C, false, ptrs, stream));
  MOE_TRY(dispatch(dt, [&](auto tag) -> int {
    using S = decltype(tag);
    return swiglu_forward(static_cast<S*>(ws.f2), static_cast<const S*>(ws.a), static_cast<const S*>(ws.b),
                          ws.gate_rows, N, F, stream);
  }));
  MOE_TRY(grouped_mm_nt(cublas, dt, ws.rows_c2, ws.f2, w.w_down, off, E, C, F, false, ptrs, stream));
  return combine(cfg, y, ws.rows_c2, ws, stream);
}

int moe_forward(const MoeConfig& cfg, const MoeWeights& w, const void* x, void* y, MoeWorkspace& ws,
                void* cublas, void* stream) {
  MOE_TRY(moe_route(cfg, w, x, ws, cublas, stream));
  return moe_experts_forward(cfg, w, x, y, ws, cublas, stream);
}

int moe_backward(const MoeConfig& cfg, const MoeWeights& w, const void* x, const void* dy, const MoeGrads& g,
                 MoeWorkspace& ws, void* cublas, void* stream) {
  if (!moe_config_ok(cfg) || ws.host_offsets == nullptr) return kInvalid;
  // cuBLAS has no float32 x float32 -> bf16 product.
  if (cfg.dtype == DType::kFloat32 && g.grad_dtype == DType::kBFloat16) return kInvalid;
  const int64_t T = cfg.T, C = cfg.C, F = cfg.F, E = cfg.E, K = cfg.K, N = T * K;
  const int64_t* off = ws.host_offsets;
  void* ptrs = cfg.grouped_gemm ? ws.gemm_ptrs : nullptr;
  const DType dt = cfg.dtype, gt = g.grad_dtype;
  const bool acc = g.accumulate;
  const auto s = static_cast<cudaStream_t>(stream);
  if (T == 0) {  // no rows: weight gradients are zero (or unchanged), dx has no rows
    if (acc) return 0;
    const int64_t ge = dtype_size(gt);
    void* const grads[] = {g.d_router, g.dw_gate, g.dw_up, g.dw_down};
    const int64_t sizes[] = {E * C, E * F * C, E * F * C, E * C * F};
    for (int i = 0; i < 4; ++i)
      MOE_TRY(static_cast<int>(cudaMemsetAsync(grads[i], 0, static_cast<size_t>(sizes[i] * ge), s)));
    return 0;
  }

  // Expert path (FusedMoEFn::backward). rows_c1 = dy rows; f1 = dh = dy_rows W_down[e].
  MOE_TRY(dispatch(dt, [&](auto tag) -> int {
    using S = decltype(tag);
    return gather_rows(static_cast<S*>(ws.rows_c1), static_cast<const S*>(dy), ws.token_index, N, C, stream);
  }));
  MOE_TRY(grouped_mm_nn(cublas, dt, ws.f1, ws.rows_c1, w.w_down, off, E, C, F, false, ptrs, stream));
  // f2 = gate * h, recomputed (the forward's f2 may have been reused), for dW_down = dy_rows^T (gate h).
  MOE_TRY(dispatch(dt, [&](auto tag) -> int {
    using S = decltype(tag);
    return swiglu_forward(static_cast<S*>(ws.f2), static_cast<const S*>(ws.a), static_cast<const S*>(ws.b),
                          ws.gate_rows, N, F, stream);
  }));
  MOE_TRY(grouped_weight_grad(cublas, dt, gt, g.dw_down, ws.rows_c1, ws.f2, off, E, C, F, acc, ptrs, stream));
  // f1 = da (in place over dh), f2 = db, d_gate per row; then rows_c1 = x rows.
  MOE_TRY(dispatch(dt, [&](auto tag) -> int {
    using S = decltype(tag);
    MOE_TRY(swiglu_backward(static_cast<S*>(ws.f1), static_cast<S*>(ws.f2), ws.d_gate_rows,
                            static_cast<const S*>(ws.f1), static_cast<const S*>(ws.a),
                            static_cast<const S*>(ws.b), ws.gate_rows, N, F, stream));
    return gather_rows(static_cast<S*>(ws.rows_c1), static_cast<const S*>(x), ws.token_index, N, C, stream);
  }));
  MOE_TRY(grouped_weight_grad(cublas, dt, gt, g.dw_gate, ws.f1, ws.rows_c1, off, E, F, C, acc, ptrs, stream));
  MOE_TRY(grouped_weight_grad(cublas, dt, gt, g.dw_up, ws.f2, ws.rows_c1, off, E, F, C, acc, ptrs, stream));
  MOE_TRY(grouped_mm_nn(cublas, dt, ws.rows_c2, ws.f1, w.w_gate, off, E, F, C, false, ptrs, stream));
  MOE_TRY(grouped_mm_nn(cublas, dt, ws.rows_c2, ws.f2, w.w_up, off, E, F, C, true, ptrs, stream));
  MOE_TRY(combine(cfg, g.dx, ws.rows_c2, ws, stream));

  // Router path: d_gate of assignment p is that of its row; through renormalisation and softmax.
  MOE_TRY(gather_rows(ws.d_topk_gate, ws.d_gate_rows, ws.row_of_assignment, N, 1, stream));
  MOE_TRY(topk_softmax_backward(ws.d_logits, ws.d_topk_gate, g.d_probs, ws.probs, ws.topk_gate, ws.topk_id, T,
                                E, K, cfg.renormalize, stream));
  const void* dl = ws.d_logits;
  if (dt == DType::kBFloat16) {
    MOE_TRY(convert(static_cast<bf16*>(ws.d_logits_cast), ws.d_logits, T * E, stream));
    dl = ws.d_logits_cast;
  }
  // d_router [E, C] (+)= d_logits^T [E, T] @ x [T, C];  dx [T, C] += d_logits [T, E] @ Wr [E, C].
  MOE_TRY(gemm(cublas, dt, gt, true, false, E, C, T, dl, x, g.d_router, acc, stream));
  return gemm(cublas, dt, dt, false, false, T, C, E, dl, w.router, g.dx, true, stream);
}

}  // namespace moeforge::kernels::cuda
