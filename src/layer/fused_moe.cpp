#include "moeforge/layer/fused_moe.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>

#include "grouped_ops.h"
#include "moeforge/layer/precision.h"

namespace moeforge {

namespace {
std::atomic<int64_t> g_fused_grad_accumulations{0};
}  // namespace

void detail::note_fused_grad_accumulation() {
  g_fused_grad_accumulations.fetch_add(1);
}
int64_t fused_grad_accumulations() {
  return g_fused_grad_accumulations.load();
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using detail::scratch;

class FusedMoEFn : public torch::autograd::Function<FusedMoEFn> {
 public:
  // x [T, C], gate [N], weights {w_up, w_down} for GELU experts or {w_up, w_down, w_gate} for SwiGLU ones
  // (w_up, w_gate [E, F, C], w_down [E, C, F]; a list, because LibTorch 1.13's autograd functions take no
  // undefined tensor inputs), token_index [N] int64 grouped by expert. GELU: h = gelu(a), a = x W_up^T.
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor gate,
                               at::TensorList weights, torch::Tensor token_index, std::vector<int64_t> off,
                               Workspace* ws, detail::HealthSums* health) {
    const bool swiglu = weights.size() == 3;
    const auto &w_up = weights[0], &w_down = weights[1];
    const auto w_gate = swiglu ? weights[2] : torch::Tensor();
    const int64_t T = x.size(0), C = x.size(1), N = token_index.size(0), F = w_up.size(1);
    const auto opt = x.options();
    auto xs = scratch(ws, "rows_c1", {N, C}, opt);  // [N, C] x rows in expert order
    auto a = scratch(ws, "a", {N, F}, opt);         // [N, F] gate pre-activation, GELU: up projection (saved)
    auto b = swiglu ? scratch(ws, "b", {N, F}, opt) : torch::Tensor();  // [N, F] up projection (saved)
    auto h = scratch(ws, "rows_f2", {N, F}, opt);       // [N, F] gate * act (ungated with health)
    auto y_rows = scratch(ws, "rows_c2", {N, C}, opt);  // [N, C] gated (ungated with health) expert outputs
    auto y = torch::zeros({T, C}, opt);                 // [T, C]
    const auto h_gate = health ? torch::Tensor() : gate;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_moe_forward", [&] {
      detail::gather_rows<scalar_t>(xs, x, token_index);
      if (swiglu) {
        detail::grouped_mm_nt<scalar_t>(xs, off, {{&a, &w_gate}, {&b, &w_up}});
        detail::swiglu_forward<scalar_t>(h, a, b, h_gate);
      } else {
        detail::grouped_mm_nt<scalar_t>(a, xs, w_up, off);
        detail::gelu_forward<scalar_t>(h, a, h_gate);
      }
      detail::grouped_mm_nt<scalar_t>(y_rows, h, w_down, off);
      if (health) health->template add<scalar_t>(y_rows, off);
      detail::scatter_add_gated<scalar_t>(y, y_rows, token_index, health ? gate : torch::Tensor());
    });
    ctx->save_for_backward({x, gate, w_gate, w_up, w_down, token_index, a, b});
    ctx->saved_data["off"] = off;
    ctx->saved_data["ws"] = reinterpret_cast<int64_t>(ws);
    ctx->saved_data["swiglu"] = swiglu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto x = s[0], gate = s[1], w_gate = s[2], w_up = s[3], w_down = s[4], token_index = s[5], a = s[6],
         b = s[7];
    const auto off = ctx->saved_data["off"].toIntVector();
    auto* ws = reinterpret_cast<Workspace*>(ctx->saved_data["ws"].toInt());
    const int64_t T = x.size(0), C = x.size(1), N = token_index.size(0), F = w_up.size(1);
    const bool swiglu = ctx->saved_data["swiglu"].toBool();
    const auto opt = x.options();
    auto gy = grads[0].contiguous();                     // [T, C]
    auto rows_c1 = scratch(ws, "rows_c1", {N, C}, opt);  // dy rows, then x rows
    auto dh = scratch(ws, "rows_f1", {N, F}, opt);       // [N, F] dy_row W_down, then da in place
    auto hg = scratch(ws, "rows_f2", {N, F}, opt);       // [N, F] gate * h, then db
    auto dxs = scratch(ws, "rows_c2", {N, C}, opt);      // [N, C]
    auto d_gate = torch::empty({N}, opt);
    auto dx = torch::zeros({T, C}, opt);
    torch::Tensor dw_gate, dw_up, dw_down;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_moe_backward", [&] {
      detail::gather_rows<scalar_t>(rows_c1, gy, token_index);
      detail::grouped_mm_nn(dh, rows_c1, w_down, off, false);
      // h recomputed rather than kept from forward
      if (swiglu)
        detail::swiglu_forward<scalar_t>(hg, a, b, gate);
      else
        detail::gelu_forward<scalar_t>(hg, a, gate);
      if (ctx->needs_input_grad(3)) dw_down = detail::grouped_weight_grad(rows_c1, hg, off, w_down);
      auto& da = dh;  // in place
      detail::gather_rows<scalar_t>(rows_c1, x, token_index);
      if (swiglu) {
        detail::swiglu_backward<scalar_t>(dh, hg, d_gate, dh, a, b, gate);
        auto& db = hg;
        if (ctx->needs_input_grad(4)) dw_gate = detail::grouped_weight_grad(da, rows_c1, off, w_gate);
        if (ctx->needs_input_grad(2)) dw_up = detail::grouped_weight_grad(db, rows_c1, off, w_up);
        detail::grouped_mm_nn(dxs, da, w_gate, off, false);
        detail::grouped_mm_nn(dxs, db, w_up, off, true);
      } else {
        detail::gelu_backward<scalar_t>(da, d_gate, dh, a, gate);
        if (ctx->needs_input_grad(2)) dw_up = detail::grouped_weight_grad(da, rows_c1, off, w_up);
        detail::grouped_mm_nn(dxs, da, w_up, off, false);
      }
      detail::scatter_add_gated<scalar_t>(dx, dxs, token_index, torch::Tensor());
    });
    // One gradient per input, the weights' in list order; none for token_index, off, ws, health.
    variable_list out = {dx, d_gate, dw_up, dw_down};
    if (swiglu) out.push_back(dw_gate);
    out.resize(out.size() + 4);
    return out;
  }
};

// --- The bf16 path (train.precision = "bf16"; docs/performance.md, "bf16 training") ---
// Float32 activations, the expert products in bf16 (grouped_mm_bf16): the pre-activations, the activation,
// the gate and the scatter stay float32, as do the saved a and b. The bf16 copies of the weights are made
// once per forward and kept for backward.

struct Bf16Weights {
  torch::Tensor up, down, gate;  // bf16 [E, O, I]; gate undefined for GELU experts
};

// The forward pass: a (and b for SwiGLU) filled with the pre-activations, y [T, C] returned.
torch::Tensor bf16_forward(const torch::Tensor& x, const torch::Tensor& gate, const Bf16Weights& w,
                           const torch::Tensor& token_index, const std::vector<int64_t>& off, Workspace* ws,
                           detail::HealthSums* health, torch::Tensor& a, torch::Tensor& b,
                           bool small_groups = false) {
  const bool swiglu = w.gate.defined();
  const int64_t T = x.size(0), C = x.size(1), N = token_index.size(0), F = w.up.size(1);
  // The bf16 operands' layout (grouped_ops.h): padded for oneDNN, unpadded when every group goes to the
  // small-GEMM kernel (decode), which needs no padding.
  bool all_small = small_groups;
  for (size_t e = 0; all_small && e + 1 < off.size(); ++e)
    all_small = off[e + 1] - off[e] <= detail::kSmallGroupRows;
  const auto poff = all_small ? off : detail::padded_offsets(off);
  const int64_t Np = poff.back();
  const auto opt = x.options(), opt16 = opt.dtype(torch::kBFloat16);
  auto xs = scratch(ws, "rows_c1", {N, C}, opt);  // [N, C] x rows in expert order
  detail::gather_rows<float>(xs, x, token_index);
  const auto xs16 = detail::to_bf16_padded(ws, "rows_c1_16", xs, off, poff);  // [Np, C]
  auto tmp_f = scratch(ws, "rows_f_16", {Np, F}, opt16);
  a = scratch(ws, "a", {N, F}, opt);
  auto h = scratch(ws, "rows_f2", {N, F}, opt);  // [N, F] gate * act (ungated with health)
  const auto h_gate = health ? torch::Tensor() : gate;
  if (swiglu) {
    b = scratch(ws, "b", {N, F}, opt);
    detail::grouped_mm_bf16(a, xs16, w.gate, off, poff, /*transpose_w=*/true, /*accumulate=*/false, tmp_f,
                            small_groups);
    detail::grouped_mm_bf16(b, xs16, w.up, off, poff, true, false, tmp_f, small_groups);
    detail::swiglu_forward<float>(h, a, b, h_gate);
  } else {
    detail::grouped_mm_bf16(a, xs16, w.up, off, poff, true, false, tmp_f, small_groups);
    detail::gelu_forward<float>(h, a, h_gate);
  }
  const auto h16 = detail::to_bf16_padded(ws, "rows_f2_16", h, off, poff);
  auto y_rows = scratch(ws, "rows_c2", {N, C}, opt);
  auto tmp_c = scratch(ws, "rows_c2_16", {Np, C}, opt16);
  detail::grouped_mm_bf16(y_rows, h16, w.down, off, poff, true, false, tmp_c, small_groups);
  if (health) health->add<float>(y_rows, off);
  auto y = torch::zeros({T, C}, opt);
  detail::scatter_add_gated<float>(y, y_rows, token_index, health ? gate : torch::Tensor());
  return y;
}

Bf16Weights bf16_copies(at::TensorList weights) {
  const auto b16 = torch::kBFloat16;
  return {weights[0].to(b16), weights[1].to(b16), weights.size() == 3 ? weights[2].to(b16) : torch::Tensor()};
}

class FusedMoEBf16Fn : public torch::autograd::Function<FusedMoEBf16Fn> {
 public:
  // The inputs of FusedMoEFn::forward, float32 only.
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor gate,
                               at::TensorList weights, torch::Tensor token_index, std::vector<int64_t> off,
                               Workspace* ws, detail::HealthSums* health) {
    const auto w16 = bf16_copies(weights);
    torch::Tensor a, b;
    auto y = bf16_forward(x, gate, w16, token_index, off, ws, health, a, b);
    ctx->save_for_backward({x, gate, weights[0], weights[1],
                            weights.size() == 3 ? weights[2] : torch::Tensor(), token_index, a, b, w16.up,
                            w16.down, w16.gate});
    ctx->saved_data["off"] = off;
    ctx->saved_data["ws"] = reinterpret_cast<int64_t>(ws);
    return y;
  }

  // FusedMoEFn::backward's steps with each product's operands in bf16 (padded layout, grouped_ops.h).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto x = s[0], gate = s[1], w_up = s[2], w_down = s[3], w_gate = s[4], token_index = s[5], a = s[6],
         b = s[7];
    const Bf16Weights w16{s[8], s[9], s[10]};
    const bool swiglu = w_gate.defined();
    const auto off = ctx->saved_data["off"].toIntVector();
    const auto poff = detail::padded_offsets(off);
    auto* ws = reinterpret_cast<Workspace*>(ctx->saved_data["ws"].toInt());
    const int64_t T = x.size(0), C = x.size(1), N = token_index.size(0), F = w_up.size(1), Np = poff.back();
    const auto opt = x.options(), opt16 = opt.dtype(torch::kBFloat16);
    auto gy = grads[0].contiguous();                     // [T, C]
    auto rows_c1 = scratch(ws, "rows_c1", {N, C}, opt);  // dy rows, then x rows
    auto dh = scratch(ws, "rows_f1", {N, F}, opt);       // [N, F] dy_row W_down, then da in place
    auto hg = scratch(ws, "rows_f2", {N, F}, opt);       // [N, F] gate * h, then db
    auto dxs = scratch(ws, "rows_c2", {N, C}, opt);      // [N, C]
    auto tmp_f = scratch(ws, "rows_f_16", {Np, F}, opt16);
    auto tmp_c = scratch(ws, "rows_c2_16", {Np, C}, opt16);
    auto d_gate = torch::empty({N}, opt);
    auto dx = torch::zeros({T, C}, opt);
    torch::Tensor dw_gate, dw_up, dw_down;
    detail::gather_rows<float>(rows_c1, gy, token_index);
    const auto gy16 = detail::to_bf16_padded(ws, "rows_c1_16", rows_c1, off, poff);
    detail::grouped_mm_bf16(dh, gy16, w16.down, off, poff, /*transpose_w=*/false, /*accumulate=*/false,
                            tmp_f);
    if (swiglu)
      detail::swiglu_forward<float>(hg, a, b, gate);
    else
      detail::gelu_forward<float>(hg, a, gate);
    if (ctx->needs_input_grad(3))
      dw_down = detail::grouped_weight_grad_bf16(
          gy16, detail::to_bf16_padded(ws, "rows_f2_16", hg, off, poff), poff, w_down);
    auto& da = dh;  // in place
    detail::gather_rows<float>(rows_c1, x, token_index);
    const auto xs16 = detail::to_bf16_padded(ws, "rows_c3_16", rows_c1, off, poff);
    if (swiglu) {
      detail::swiglu_backward<float>(dh, hg, d_gate, dh, a, b, gate);
      auto& db = hg;
      const auto da16 = detail::to_bf16_padded(ws, "rows_f1_16", da, off, poff);
      const auto db16 = detail::to_bf16_padded(ws, "rows_f2_16", db, off, poff);
      if (ctx->needs_input_grad(4)) dw_gate = detail::grouped_weight_grad_bf16(da16, xs16, poff, w_gate);
      if (ctx->needs_input_grad(2)) dw_up = detail::grouped_weight_grad_bf16(db16, xs16, poff, w_up);
      detail::grouped_mm_bf16(dxs, da16, w16.gate, off, poff, false, false, tmp_c);
      detail::grouped_mm_bf16(dxs, db16, w16.up, off, poff, false, true, tmp_c);
    } else {
      detail::gelu_backward<float>(da, d_gate, dh, a, gate);
      const auto da16 = detail::to_bf16_padded(ws, "rows_f1_16", da, off, poff);
      if (ctx->needs_input_grad(2)) dw_up = detail::grouped_weight_grad_bf16(da16, xs16, poff, w_up);
      detail::grouped_mm_bf16(dxs, da16, w16.up, off, poff, false, false, tmp_c);
    }
    detail::scatter_add_gated<float>(dx, dxs, token_index, torch::Tensor());
    variable_list out = {dx, d_gate, dw_up, dw_down};
    if (swiglu) out.push_back(dw_gate);
    out.resize(out.size() + 4);
    return out;
  }
};

// Forward without autograd (inference, evaluation): the same kernels over chunks of whole experts of about
// kInferenceChunkRows rows, so the intermediates take [chunk, 2F + 2C] instead of [N, 3F + 2C] (at the top-2
// shape 12 MiB instead of 128 MiB; the plain loop's per-expert temporaries are of the chunk's order too).
constexpr int64_t kInferenceChunkRows = 1024;

torch::Tensor fused_moe_no_grad(const torch::Tensor& x, const torch::Tensor& gate,
                                const torch::Tensor& w_gate, const torch::Tensor& w_up,
                                const torch::Tensor& w_down, const torch::Tensor& token_index,
                                const std::vector<int64_t>& off, Workspace* ws, detail::HealthSums* health) {
  const int64_t T = x.size(0), C = x.size(1), F = w_up.size(1), E = static_cast<int64_t>(off.size()) - 1;
  const bool swiglu = w_gate.defined();  // else GELU
  const auto opt = x.options();
  // Chunks: runs of consecutive experts, closed once they reach the row budget.
  std::vector<int64_t> cut = {0};
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] - off[cut.back()] >= kInferenceChunkRows || e + 1 == E) cut.push_back(e + 1);
  int64_t rows = 0;
  for (size_t i = 0; i + 1 < cut.size(); ++i) rows = std::max(rows, off[cut[i + 1]] - off[cut[i]]);
  auto y = torch::zeros({T, C}, opt);  // [T, C]
  if (rows == 0) return y;
  auto xs_all = scratch(ws, "rows_c1", {rows, C}, opt);
  auto a_all = scratch(ws, "a", {rows, F}, opt);
  auto b_all = swiglu ? scratch(ws, "b", {rows, F}, opt) : torch::Tensor();
  auto y_all = scratch(ws, "rows_c2", {rows, C}, opt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_moe_no_grad", [&] {
    for (size_t i = 0; i + 1 < cut.size(); ++i) {
      const int64_t r0 = off[cut[i]], n = off[cut[i + 1]] - r0;
      if (n == 0) continue;
      std::vector<int64_t> local(off.size());  // offsets relative to the chunk; other experts empty
      for (size_t e = 0; e < off.size(); ++e) local[e] = std::clamp(off[e] - r0, int64_t{0}, n);
      auto xs = xs_all.narrow(0, 0, n), a = a_all.narrow(0, 0, n), y_rows = y_all.narrow(0, 0, n);
      auto idx = token_index.narrow(0, r0, n);
      auto g = gate.narrow(0, r0, n);
      const auto h_gate = health ? torch::Tensor() : g;
      detail::gather_rows<scalar_t>(xs, x, idx);
      if (swiglu) {
        auto b = b_all.narrow(0, 0, n);
        detail::grouped_mm_nt<scalar_t>(xs, local, {{&a, &w_gate}, {&b, &w_up}});
        detail::swiglu_forward<scalar_t>(a, a, b, h_gate);  // h in place of a
      } else {
        detail::grouped_mm_nt<scalar_t>(a, xs, w_up, local);
        detail::gelu_forward<scalar_t>(a, a, h_gate);  // h in place of a
      }
      detail::grouped_mm_nt<scalar_t>(y_rows, a, w_down, local);
      if (health) health->template add<scalar_t>(y_rows, local);
      detail::scatter_add_gated<scalar_t>(y, y_rows, idx, health ? g : torch::Tensor());
    }
  });
  return y;
}

bool weights_are(const ExpertWeights& w, torch::ScalarType t) {
  return w.w_up.scalar_type() == t && w.w_down.scalar_type() == t &&
         (w.act == ExpertAct::kGELU || w.w_gate.scalar_type() == t);
}

// bf16-stored weights (inference, model/inference_precision.h) for float32 activations, without gradients.
bool stored_bf16(const torch::Tensor& x, const ExpertWeights& w) {
  return x.scalar_type() == torch::kFloat && weights_are(w, torch::kBFloat16) && !at::GradMode::is_enabled();
}
}  // namespace

bool fused_moe_supported(const torch::Tensor& x, const ExpertWeights& w) {
  return x.device().is_cpu() && (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble) &&
         (weights_are(w, x.scalar_type()) || stored_bf16(x, w));
}

torch::Tensor fused_moe(const torch::Tensor& x, const RoutingPlan& plan, const ExpertWeights& w,
                        Workspace* ws, ExpertHealth* health) {
  TORCH_CHECK(x.dim() == 2, "fused_moe: x must be [T, C]");
  TORCH_CHECK(fused_moe_supported(x, w), "fused_moe: needs CPU float/double input and weights of its dtype");
  const auto off = plan.offsets();
  TORCH_CHECK(static_cast<int64_t>(off.size()) == w.w_up.size(0) + 1,
              "fused_moe: offsets must have E+1 entries");
  TORCH_CHECK(off.back() == plan.n_assign(), "fused_moe: offsets must span the assignments");
  const bool swiglu = w.act == ExpertAct::kSwiGLU;
  TORCH_CHECK(!swiglu || w.w_gate.defined(), "fused_moe: SwiGLU experts need w_gate");
  auto index = plan.token_index.to(torch::kCPU, torch::kLong).contiguous();
  auto gate = plan.gate.to(x.scalar_type()).contiguous();          // differentiable cast
  auto w_gate = swiglu ? w.w_gate.contiguous() : torch::Tensor();  // undefined: GELU experts
  auto w_up = w.w_up.contiguous(), w_down = w.w_down.contiguous();
  const auto weights = swiglu ? std::vector<torch::Tensor>{w_up, w_down, w_gate} : std::vector{w_up, w_down};
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || gate.requires_grad() ||
       std::any_of(weights.begin(), weights.end(), [](const torch::Tensor& t) { return t.requires_grad(); }));
  std::optional<detail::HealthSums> sums;
  if (health) sums.emplace(off);
  detail::HealthSums* hs = sums ? &*sums : nullptr;
  // bf16 products for float32 activations when the thread's precision asks for them (precision.h), or when
  // the weights are stored in bf16 (inference; decode's few rows a group then take small_mm_nt_bf16).
  const bool bf16 = matmul_precision() == MatmulPrecision::kBFloat16 && x.scalar_type() == torch::kFloat;
  torch::Tensor y;
  if (stored_bf16(x, w)) {
    torch::Tensor a, b;
    y = bf16_forward(x.contiguous(), gate, bf16_copies(weights), index, off, ws, hs, a, b,
                     /*small_groups=*/true);
  } else if (bf16 && needs_grad) {
    y = FusedMoEBf16Fn::apply(x.contiguous(), gate, at::TensorList(weights), index, off, ws, hs);
  } else if (bf16) {
    torch::Tensor a, b;
    y = bf16_forward(x.contiguous(), gate, bf16_copies(weights), index, off, ws, hs, a, b);
  } else {
    y = needs_grad ? FusedMoEFn::apply(x.contiguous(), gate, at::TensorList(weights), index, off, ws, hs)
                   : fused_moe_no_grad(x.contiguous(), gate, w_gate, w_up, w_down, index, off, ws, hs);
  }
  if (health) *health = sums->result();
  return y;
}

}  // namespace moeforge
