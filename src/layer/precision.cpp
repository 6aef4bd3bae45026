#include "moeforge/layer/precision.h"

#include "grouped_ops.h"
#include "moeforge/util/error.h"

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

MatmulPrecision precision_on_this_cpu(const std::string& name, const CpuFeatures& cpu,
                                      const std::string& field, const std::string& use_instead,
                                      std::string* native) {
  const auto p = parse_matmul_precision(name);
  if (p == MatmulPrecision::kFloat32) return p;
  const std::string has = bf16_support(cpu);
  if (has.empty())
    throw ConfigError(field,
                      "\"bf16\" needs a CPU with native bf16 products (AVX512-BF16 or AMX-BF16); this one "
                      "has neither (see `moeforge info`), so its bf16 products would be converted to "
                      "float32 and run slower than \"fp32\". Use " +
                          use_instead);
  if (native) *native = has;
  return p;
}

namespace {
// x [..., I] times w [O, I] for a few rows without gradients on the CPU (decode), in the small-GEMM
// kernels (grouped_ops.h, small_linear): x float32 and w float32 or bf16-stored (x then rounded to bf16);
// the sums in float32, the bias added in float32. Undefined when the product is not such a one.
torch::Tensor small_rows_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias) {
  const int64_t I = x.size(-1), O = w.size(0), rows = I > 0 ? x.numel() / I : 0;
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w.requires_grad() || (bias.defined() && bias.requires_grad()));
  if (grad || !x.is_cpu() || !w.is_cpu() || !w.is_contiguous() || rows == 0 || rows > detail::kSmallGroupRows)
    return {};
  auto y = torch::empty({rows, O}, x.options());
  if (w.scalar_type() == torch::kBFloat16) {
    const auto x16 = x.reshape({rows, I}).to(torch::kBFloat16).contiguous();
    detail::small_linear(y.data_ptr<float>(), O, x16.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(),
                         rows, O, I);
  } else {
    const auto xc = x.reshape({rows, I}).contiguous();
    detail::small_linear(y.data_ptr<float>(), O, xc.data_ptr<float>(), w.data_ptr<float>(), rows, O, I);
  }
  if (bias.defined()) y.add_(bias.to(y.scalar_type()));
  auto shape = x.sizes().vec();
  shape.back() = O;
  return y.view(shape);
}

// x [..., I] float32 times a bf16-stored w [O, I] (inference, model/inference_precision.h): a few rows
// in small_mm_nt_bf16 (decode: LibTorch's bf16 product of one row runs at a few GFLOP/s), more in
// LibTorch's bf16 product (oneDNN, its output rounded to bf16). Both round x to bf16.
torch::Tensor linear_stored_bf16(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias) {
  if (auto y = small_rows_linear(x, w, bias); y.defined()) return y;
  auto y = torch::matmul(x.to(torch::kBFloat16), w.t()).to(x.scalar_type());
  return bias.defined() ? y + bias.to(y.scalar_type()) : y;  // the bias in float32, as the small path
}
}  // namespace

torch::Tensor linear_mp(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias) {
  if (w.scalar_type() == torch::kBFloat16 && x.scalar_type() == torch::kFloat)
    return linear_stored_bf16(x, w, bias);
  // Only float32 activations are narrowed: float64 (the golden tests) and bf16 inputs run as they are.
  if (t_precision == MatmulPrecision::kFloat32 || x.scalar_type() != torch::kFloat) {
    if (x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat)
      if (auto y = small_rows_linear(x, w, bias); y.defined()) return y;
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
