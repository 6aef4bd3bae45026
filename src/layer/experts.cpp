#include "moeforge/layer/experts.h"

#include <cmath>

#include "grouped_ops.h"
#include "moeforge/layer/precision.h"

namespace moeforge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using detail::scratch;

// SwiGLU experts: the GEMMs through grouped_mm_nt (small groups to the small-GEMM kernel), the activation as
// one fused pass (kernels/cpu/swiglu), intermediates from the workspace; backward keeps only a and b.
class GroupedSwiGLUFn : public torch::autograd::Function<GroupedSwiGLUFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w_gate,
                               torch::Tensor w_up, torch::Tensor w_down, std::vector<int64_t> off,
                               Workspace* ws) {
    const int64_t N = x.size(0), F = w_up.size(1), C = w_down.size(1);
    const auto opt = x.options();
    auto a = scratch(ws, "a", {N, F}, opt);        // [N, F] gate pre-activation
    auto b = scratch(ws, "b", {N, F}, opt);        // [N, F] up projection
    auto h = scratch(ws, "rows_f2", {N, F}, opt);  // [N, F]
    auto y = torch::empty({N, C}, opt);            // [N, C]
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "experts_swiglu_forward", [&] {
      detail::grouped_mm_nt<scalar_t>(x, off, {{&a, &w_gate}, {&b, &w_up}});
      detail::swiglu_forward<scalar_t>(h, a, b, torch::Tensor());
      detail::grouped_mm_nt<scalar_t>(y, h, w_down, off);
    });
    ctx->save_for_backward({x, a, b, w_gate, w_up, w_down});
    ctx->saved_data["off"] = off;
    ctx->saved_data["ws"] = reinterpret_cast<int64_t>(ws);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], a = saved[1], b = saved[2], w_gate = saved[3], w_up = saved[4], w_down = saved[5];
    const auto off = ctx->saved_data["off"].toIntVector();
    auto* ws = reinterpret_cast<Workspace*>(ctx->saved_data["ws"].toInt());
    const int64_t N = x.size(0), F = w_up.size(1);
    const auto opt = x.options();
    auto gy = grads[0].contiguous();                // [N, C]
    auto dh = scratch(ws, "rows_f1", {N, F}, opt);  // [N, F] gy W_down, then da in place
    auto h = scratch(ws, "rows_f2", {N, F}, opt);   // [N, F] recomputed rather than saved, then db
    auto dx = torch::empty_like(x);                 // [N, C]
    torch::Tensor dw_gate, dw_up, dw_down, no_gate;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "experts_swiglu_backward", [&] {
      detail::grouped_mm_nn(dh, gy, w_down, off, false);
      detail::swiglu_forward<scalar_t>(h, a, b, no_gate);
      if (ctx->needs_input_grad(3)) dw_down = detail::grouped_weight_grad(gy, h, off, w_down);
      detail::swiglu_backward<scalar_t>(dh, h, no_gate, dh, a, b, no_gate);
      if (ctx->needs_input_grad(1)) dw_gate = detail::grouped_weight_grad(dh, x, off, w_gate);
      if (ctx->needs_input_grad(2)) dw_up = detail::grouped_weight_grad(h, x, off, w_up);
      detail::grouped_mm_nn(dx, dh, w_gate, off, false);
      detail::grouped_mm_nn(dx, h, w_up, off, true);
    });
    return {dx, dw_gate, dw_up, dw_down, torch::Tensor(), torch::Tensor()};
  }
};

// Whether the CPU kernels (kernels/cpu) can take t: CPU float or double.
bool kernels_fit(const torch::Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble);
}

// h = gelu(a) and da = dh gelu'(a): the fused CPU kernel (kernels/cpu/gelu) where the kernels fit,
// LibTorch's gelu elsewhere.

// h from the workspace when there is one.
torch::Tensor gelu_of(const torch::Tensor& a, Workspace* ws) {
  if (!kernels_fit(a)) return torch::gelu(a);
  auto h = scratch(ws, "rows_f2", a.sizes(), a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "experts_gelu",
                             [&] { detail::gelu_forward<scalar_t>(h, a, torch::Tensor()); });
  return h;
}

// dh becomes da (in place) with the own kernel.
torch::Tensor gelu_backward_of(torch::Tensor& dh, const torch::Tensor& a) {
  if (!kernels_fit(a)) return at::gelu_backward(dh, a);
  torch::Tensor no_gate;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "experts_gelu_backward",
                             [&] { detail::gelu_backward<scalar_t>(dh, no_gate, dh, a, no_gate); });
  return dh;
}

class GroupedGELUFn : public torch::autograd::Function<GroupedGELUFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w_up,
                               torch::Tensor w_down, std::vector<int64_t> off, Workspace* ws) {
    const int64_t N = x.size(0), F = w_up.size(1), C = w_down.size(1);
    auto a = scratch(ws, "a", {N, F}, x.options());                 // [N, F] (saved)
    auto y = torch::empty({N, C}, x.options());                     // [N, C]
    detail::grouped_mm_nn(a, x, w_up.transpose(1, 2), off, false);  // x @ w_up[e]^T
    auto h = gelu_of(a, ws);                                        // [N, F]
    detail::grouped_mm_nn(y, h, w_down.transpose(1, 2), off, false);
    ctx->save_for_backward({x, a, w_up, w_down});
    ctx->saved_data["off"] = off;
    ctx->saved_data["ws"] = reinterpret_cast<int64_t>(ws);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], a = saved[1], w_up = saved[2], w_down = saved[3];
    const auto off = ctx->saved_data["off"].toIntVector();
    auto* ws = reinterpret_cast<Workspace*>(ctx->saved_data["ws"].toInt());
    auto gy = grads[0].contiguous();
    auto h = gelu_of(a, ws);                                   // [N, F] recomputed
    auto dh = scratch(ws, "rows_f1", a.sizes(), a.options());  // [N, F], then da in place
    detail::grouped_mm_nn(dh, gy, w_down, off, false);
    torch::Tensor dw_down, dw_up;
    if (ctx->needs_input_grad(2)) dw_down = detail::grouped_weight_grad(gy, h, off, w_down);
    auto da = gelu_backward_of(dh, a);
    auto dx = torch::empty_like(x);
    detail::grouped_mm_nn(dx, da, w_up, off, false);
    if (ctx->needs_input_grad(1)) dw_up = detail::grouped_weight_grad(da, x, off, w_up);
    return {dx, dw_up, dw_down, torch::Tensor(), torch::Tensor()};
  }
};

void check_shapes(const torch::Tensor& x, const std::vector<int64_t>& off, const ExpertWeights& w) {
  TORCH_CHECK(x.dim() == 2, "experts: x_sorted must be [N, C]");
  TORCH_CHECK(static_cast<int64_t>(off.size()) == w.w_up.size(0) + 1,
              "experts: offsets must have E+1 entries");
  TORCH_CHECK(off.front() == 0 && off.back() == x.size(0), "experts: offsets must span [0, N]");
}

}  // namespace

torch::Tensor experts_reference(const torch::Tensor& x_sorted, const std::vector<int64_t>& off,
                                const ExpertWeights& w) {
  check_shapes(x_sorted, off, w);
  const int64_t E = w.w_up.size(0);
  std::vector<torch::Tensor> outs;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    auto xs = x_sorted.narrow(0, off[e], n);  // [n, C]
    torch::Tensor h;                          // [n, F]
    if (w.act == ExpertAct::kSwiGLU)
      h = torch::silu(linear_mp(xs, w.w_gate[e])) * linear_mp(xs, w.w_up[e]);
    else
      h = torch::gelu(linear_mp(xs, w.w_up[e]));
    outs.push_back(linear_mp(h, w.w_down[e]));  // [n, C]; products in the precision in force (precision.h)
  }
  if (outs.empty()) return torch::zeros({0, w.w_down.size(1)}, x_sorted.options());
  return torch::cat(outs, 0);
}

torch::Tensor experts_grouped(const torch::Tensor& x_sorted, const std::vector<int64_t>& off,
                              const ExpertWeights& w, Workspace* ws) {
  check_shapes(x_sorted, off, w);
  auto x = x_sorted.contiguous();
  // bf16 products (precision.h) and bf16-stored weights have no grouped twin of their own here: the fused
  // path (fused_moe.h) has them, and this unfused one takes the plain loop, whose products follow the
  // precision and the weights' dtype (linear_mp).
  if ((matmul_precision() == MatmulPrecision::kBFloat16 && x.scalar_type() == torch::kFloat) ||
      w.w_up.scalar_type() == torch::kBFloat16)
    return experts_reference(x, off, w);
  const bool fit = kernels_fit(x);
  if (w.act == ExpertAct::kSwiGLU && fit)
    return GroupedSwiGLUFn::apply(x, w.w_gate.contiguous(), w.w_up.contiguous(), w.w_down.contiguous(), off,
                                  ws);
  if (w.act == ExpertAct::kSwiGLU)
    return experts_reference(x, off, w);  // no kernels for this device/dtype yet
  return GroupedGELUFn::apply(x, w.w_up, w.w_down, off, fit ? ws : nullptr);
}

ExpertsImpl::ExpertsImpl(int64_t n_expert, int64_t d_model, int64_t d_ff, ExpertAct act, ExpertsImplKind impl)
    : act_(act), impl_(impl) {
  // nn.Linear's default initialisation per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  const double b_in = 1.0 / std::sqrt(double(d_model)), b_out = 1.0 / std::sqrt(double(d_ff));
  if (act == ExpertAct::kSwiGLU)
    w_gate = register_parameter("w_gate", torch::empty({n_expert, d_ff, d_model}).uniform_(-b_in, b_in));
  w_up = register_parameter("w_up", torch::empty({n_expert, d_ff, d_model}).uniform_(-b_in, b_in));
  w_down = register_parameter("w_down", torch::empty({n_expert, d_model, d_ff}).uniform_(-b_out, b_out));
}

torch::Tensor ExpertsImpl::forward(const torch::Tensor& x_sorted, const std::vector<int64_t>& offsets) {
  if (impl_ == ExpertsImplKind::kReference) return experts_reference(x_sorted, offsets, weights());
  return experts_grouped(x_sorted, offsets, weights(), workspace_.get());
}

DenseFFNImpl::DenseFFNImpl(int64_t d_model, int64_t d_ff, ExpertAct act) : act_(act) {
  const double b_in = 1.0 / std::sqrt(double(d_model)), b_out = 1.0 / std::sqrt(double(d_ff));
  if (act == ExpertAct::kSwiGLU)
    w_gate = register_parameter("w_gate", torch::empty({d_ff, d_model}).uniform_(-b_in, b_in));
  w_up = register_parameter("w_up", torch::empty({d_ff, d_model}).uniform_(-b_in, b_in));
  w_down = register_parameter("w_down", torch::empty({d_model, d_ff}).uniform_(-b_out, b_out));
}

torch::Tensor DenseFFNImpl::forward(const torch::Tensor& x) {
  torch::Tensor h;
  if (act_ == ExpertAct::kSwiGLU)
    h = torch::silu(linear_mp(x, w_gate)) * linear_mp(x, w_up);
  else
    h = torch::gelu(linear_mp(x, w_up));
  return linear_mp(h, w_down);  // products in the precision in force (precision.h)
}

}  // namespace moeforge
