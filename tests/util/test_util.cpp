#include "test_util.h"

#include <sstream>

namespace moeforge::test {

::testing::AssertionResult tensors_close(const torch::Tensor& actual, const torch::Tensor& expected,
                                         double atol, double rtol) {
  if (!actual.defined() || !expected.defined()) return ::testing::AssertionFailure() << "undefined tensor";
  if (actual.sizes() != expected.sizes())
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " vs expected " << expected.sizes();
  auto a = actual.detach().to(torch::kCPU, torch::kDouble).reshape(-1);
  auto b = expected.detach().to(torch::kCPU, torch::kDouble).reshape(-1);
  auto diff = (a - b).abs();
  auto bad = diff > (atol + rtol * b.abs());
  bad = bad | a.isnan() != b.isnan();
  const int64_t n_bad = bad.sum().item<int64_t>();
  if (n_bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  const double max_diff = a.numel() ? diff.max().item<double>() : 0.0;
  os << n_bad << " of " << a.numel() << " elements differ (atol " << atol << ", rtol " << rtol
     << "), max |diff| = " << max_diff << "; first:";
  auto idx = bad.nonzero().reshape(-1);
  for (int64_t i = 0; i < std::min<int64_t>(5, idx.numel()); ++i) {
    const int64_t j = idx[i].item<int64_t>();
    os << " [" << j << "] " << a[j].item<double>() << " vs " << b[j].item<double>() << ";";
  }
  return ::testing::AssertionFailure() << os.str();
}

SafeTensors load_golden(const std::string& name) {
  return read_safetensors(std::string(MOEFORGE_GOLDEN_DIR) + "/" + name + ".safetensors");
}

torch::Tensor numeric_grad(const std::function<torch::Tensor()>& f, torch::Tensor param, double eps) {
  torch::NoGradGuard ng;
  auto flat = param.view(-1);
  auto grad = torch::zeros_like(flat);
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double orig = flat[i].item<double>();
    flat[i] = orig + eps;
    const double fp = f().item<double>();
    flat[i] = orig - eps;
    const double fm = f().item<double>();
    flat[i] = orig;
    grad[i] = (fp - fm) / (2 * eps);
  }
  return grad.view(param.sizes());
}

}  // namespace moeforge::test
