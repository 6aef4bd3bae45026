#include "moeforge/layer/experts.h"

#include <cmath>

namespace moeforge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// out[rows of e] = in[rows of e] @ w[e]^T (transpose_w) or @ w[e]; w: [E, O, I]. Rows of empty experts
// are untouched (there are none).
void grouped_mm(torch::Tensor& out, const torch::Tensor& in, const torch::Tensor& w,
                const std::vector<int64_t>& off, bool transpose_w) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    auto o = out.narrow(0, off[e], n);
    at::mm_out(o, in.narrow(0, off[e], n), transpose_w ? w[e].t() : w[e]);
  }
}

// dw[e] = d[rows of e]^T @ in[rows of e]: [E, O, I]; zero for experts without rows.
torch::Tensor grouped_weight_grad(const torch::Tensor& d, const torch::Tensor& in,
                                  const std::vector<int64_t>& off, const torch::Tensor& w_like) {
  auto dw = torch::zeros_like(w_like);
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    auto o = dw[e];
    at::mm_out(o, d.narrow(0, off[e], n).t(), in.narrow(0, off[e], n));
  }
  return dw;
}

class GroupedSwiGLUFn : public torch::autograd::Function<GroupedSwiGLUFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w_gate,
                               torch::Tensor w_up, torch::Tensor w_down, std::vector<int64_t> off) {
    const int64_t N = x.size(0), F = w_up.size(1), C = w_down.size(1);
    auto a = torch::empty({N, F}, x.options());  // [N, F] gate pre-activation
    auto b = torch::empty({N, F}, x.options());  // [N, F] up projection
    auto y = torch::empty({N, C}, x.options());  // [N, C]
    grouped_mm(a, x, w_gate, off, true);
    grouped_mm(b, x, w_up, off, true);
    auto h = torch::silu(a).mul_(b);  // [N, F]
    grouped_mm(y, h, w_down, off, true);
    ctx->save_for_backward({x, a, b, w_gate, w_up, w_down});
    ctx->saved_data["off"] = off;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], a = saved[1], b = saved[2], w_gate = saved[3], w_up = saved[4], w_down = saved[5];
    const auto off = ctx->saved_data["off"].toIntVector();
    auto gy = grads[0].contiguous();  // [N, C]
    auto sa = torch::silu(a);         // [N, F]
    auto h = sa * b;                  // [N, F] recomputed rather than saved
    auto dh = torch::empty_like(a);   // [N, F]
    grouped_mm(dh, gy, w_down, off, false);
    auto dw_down = grouped_weight_grad(gy, h, off, w_down);
    auto db = dh * sa;
    auto da = at::silu_backward(dh.mul_(b), a);
    auto dx = torch::empty_like(x);
    grouped_mm(dx, da, w_gate, off, false);
    auto dx_up = torch::empty_like(x);
    grouped_mm(dx_up, db, w_up, off, false);
    dx.add_(dx_up);
    auto dw_gate = grouped_weight_grad(da, x, off, w_gate);
    auto dw_up = grouped_weight_grad(db, x, off, w_up);
    return {dx, dw_gate, dw_up, dw_down, torch::Tensor()};
  }
};

class GroupedGELUFn : public torch::autograd::Function<GroupedGELUFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w_up,
                               torch::Tensor w_down, std::vector<int64_t> off) {
    const int64_t N = x.size(0), F = w_up.size(1), C = w_down.size(1);
    auto a = torch::empty({N, F}, x.options());  // [N, F]
    auto y = torch::empty({N, C}, x.options());  // [N, C]
    grouped_mm(a, x, w_up, off, true);
    auto h = torch::gelu(a);
    grouped_mm(y, h, w_down, off, true);
    ctx->save_for_backward({x, a, w_up, w_down});
    ctx->saved_data["off"] = off;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], a = saved[1], w_up = saved[2], w_down = saved[3];
    const auto off = ctx->saved_data["off"].toIntVector();
    auto gy = grads[0].contiguous();
    auto h = torch::gelu(a);
    auto dh = torch::empty_like(a);
    grouped_mm(dh, gy, w_down, off, false);
    auto dw_down = grouped_weight_grad(gy, h, off, w_down);
    auto da = at::gelu_backward(dh, a);
    auto dx = torch::empty_like(x);
    grouped_mm(dx, da, w_up, off, false);
    auto dw_up = grouped_weight_grad(da, x, off, w_up);
    return {dx, dw_up, dw_down, torch::Tensor()};
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
      h = torch::silu(torch::matmul(xs, w.w_gate[e].t())) * torch::matmul(xs, w.w_up[e].t());
    else
      h = torch::gelu(torch::matmul(xs, w.w_up[e].t()));
    outs.push_back(torch::matmul(h, w.w_down[e].t()));  // [n, C]
  }
  if (outs.empty()) return torch::zeros({0, w.w_down.size(1)}, x_sorted.options());
  return torch::cat(outs, 0);
}

torch::Tensor experts_grouped(const torch::Tensor& x_sorted, const std::vector<int64_t>& off,
                              const ExpertWeights& w) {
  check_shapes(x_sorted, off, w);
  auto x = x_sorted.contiguous();
  if (w.act == ExpertAct::kSwiGLU) return GroupedSwiGLUFn::apply(x, w.w_gate, w.w_up, w.w_down, off);
  return GroupedGELUFn::apply(x, w.w_up, w.w_down, off);
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
  return experts_grouped(x_sorted, offsets, weights());
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
    h = torch::silu(torch::matmul(x, w_gate.t())) * torch::matmul(x, w_up.t());
  else
    h = torch::gelu(torch::matmul(x, w_up.t()));
  return torch::matmul(h, w_down.t());
}

}  // namespace moeforge
