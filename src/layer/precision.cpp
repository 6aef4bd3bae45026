#include "moeforge/layer/precision.h"

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

torch::Tensor linear_mp(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias) {
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
