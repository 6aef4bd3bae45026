#include "moeforge/model/norm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels/cpu/rmsnorm.h"

namespace moeforge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// Row chunks, one per thread at most; each chunk's weight gradient is summed in chunk order afterwards, so
// the result does not depend on which thread ran which chunk.
int64_t n_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
}

class RMSNormFn : public torch::autograd::Function<RMSNormFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_in, const torch::Tensor& w_in,
                               double eps) {
    auto x = x_in.contiguous(), w = w_in.contiguous();
    const int64_t C = x.size(-1), n = x.numel() / C;
    auto y = torch::empty_like(x);
    auto r = torch::empty({n}, x.options());
    const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>();
    float *py = y.data_ptr<float>(), *pr = r.data_ptr<float>();
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
      kernels::cpu::rmsnorm_forward(px + b * C, pw, py + b * C, pr + b, e - b, C, float(eps));
    });
    ctx->save_for_backward({x, w, r});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &r = saved[2];
    const auto dy = grads[0].contiguous();
    const int64_t C = x.size(-1), n = x.numel() / C, chunks = n_chunks(n);
    auto dx = torch::empty_like(x);
    auto dw_parts = torch::zeros({chunks, C}, x.options());
    const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>(), *pr = r.data_ptr<float>();
    const float* pg = dy.data_ptr<float>();
    float *pdx = dx.data_ptr<float>(), *pdw = dw_parts.data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * n / chunks, e = (c + 1) * n / chunks;
        kernels::cpu::rmsnorm_backward(px + b * C, pw, pr + b, pg + b * C, pdx + b * C, pdw + c * C, e - b,
                                       C);
      }
    });
    return {dx, dw_parts.sum(0), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor rms_norm_reference(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return x * torch::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  if (!x.device().is_cpu() || x.scalar_type() != torch::kFloat || w.scalar_type() != torch::kFloat ||
      x.numel() == 0)
    return rms_norm_reference(x, w, eps);
  return RMSNormFn::apply(x, w, eps);
}

}  // namespace moeforge
