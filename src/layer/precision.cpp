#include "moeforge/layer/precision.h"

#include "grouped_ops.h"

namespace moeforge {

namespace {
thread_local MatmulPrecision t_precision = MatmulPrecision::kFloat32;
}  // namespace

MatmulPrecision matmul_precision() {
  return t_precision;
}

MatmulPrecisionGuard::MatmulPrecisionGuard(MatmulPrecision p) : previous_(t_precision) {
  t_precision = p;
}
MatmulPrecisionGuard::~MatmulPrecisionGuard() {
  t_precision = previous_;
}

MatmulPrecision parse_matmul_precision(const std::string& name) {
  TORCH_CHECK(name == "fp32" || name == "bf16", "precision must be \"fp32\" or \"bf16\", got \"", name, "\"");
  return name == "bf16" ? MatmulPrecision::kBFloat16 : MatmulPrecision::kFloat32;
}

namespace {
// x [..., I] float32 times a bf16-stored w [O, I] (inference, model/inference_precision.h): a few rows
// without gradients through small_mm_nt_bf16 (decode: LibTorch's bf16 product of one row runs at a few
// GFLOP/s), more through LibTorch's bf16 product (oneDNN). Both round x to bf16 and sum in float32.
torch::Tensor linear_stored_bf16(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias) {
  const auto b16 = torch::kBFloat16;
  const int64_t I = x.size(-1), O = w.size(0), rows = I > 0 ? x.numel() / I : 0;
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad());
  if (!grad && x.is_cpu() && w.is_contiguous() && rows <= detail::kSmallGroupRows) {
    const auto x16 = x.reshape({rows, I}).to(b16).contiguous();
    auto y = torch::empty({rows, O}, x.options());
    detail::small_linear_bf16(y.data_ptr<float>(), O, x16.data_ptr<at::BFloat16>(),
                              w.data_ptr<at::BFloat16>(), rows, O, I);
    if (bias.defined()) y.add_(bias.to(y.scalar_type()));
    auto shape = x.sizes().vec();
    shape.back() = O;
    return y.view(shape);
  }
  auto y = torch::matmul(x.to(b16), w.t()).to(x.scalar_type());
  return bias.defined() ? y + bias.to(y.scalar_type()) : y;  // the bias in float32, as the small path
}
}  // namespace

torch::Tensor linear_mp(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias) {
  if (w.scalar_type() == torch::kBFloat16 && x.scalar_type() == torch::kFloat)
    return linear_stored_bf16(x, w, bias);
  // Only float32 activations are narrowed: float64 (the golden tests) and bf16 inputs run as they are.
  if (t_precision == MatmulPrecision::kFloat32 || x.scalar_type() != torch::kFloat) {
    if (!bias.defined()) return torch::matmul(x, w.t());
    auto shape = x.sizes().vec();
    shape.back() = w.size(0);
    return torch::addmm(bias, x.reshape({-1, x.size(-1)}), w.t()).view(shape);
  }
  const auto b16 = torch::kBFloat16;
  auto y = torch::linear(x.to(b16), w.to(b16), bias.defined() ? bias.to(b16) : torch::Tensor());
  return y.to(x.scalar_type());
}

}  // namespace moeforge
