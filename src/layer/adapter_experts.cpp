#include "moeforge/layer/adapter_experts.h"

#include <cmath>

namespace moeforge {

torch::Tensor adapters_reference(const torch::Tensor& z_sorted, const std::vector<int64_t>& off,
                                 const torch::Tensor& w_down, const torch::Tensor& w_up, double scale) {
  const int64_t E = w_down.size(0);
  TORCH_CHECK(int64_t(off.size()) == E + 1, "adapters: offsets must have E+1 = ", E + 1, " entries");
  TORCH_CHECK(off.back() == z_sorted.size(0), "adapters: offsets end at ", off.back(), " but z has ",
              z_sorted.size(0), " rows");
  std::vector<torch::Tensor> outs;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    auto z = z_sorted.narrow(0, off[e], n);                 // [n, C]
    auto h = torch::gelu(torch::matmul(z, w_down[e].t()));  // [n, A]
    outs.push_back(scale * torch::matmul(h, w_up[e].t()));  // [n, C]
  }
  if (outs.empty()) return torch::zeros({0, w_up.size(1)}, z_sorted.options());
  return torch::cat(outs, 0);
}

AdapterExpertsImpl::AdapterExpertsImpl(int64_t n_expert, int64_t d_model, int64_t d_adapter, double scale)
    : scale_(scale) {
  const double b_in = 1.0 / std::sqrt(double(d_model));
  w_down = register_parameter("w_down", torch::empty({n_expert, d_adapter, d_model}).uniform_(-b_in, b_in));
  w_up = register_parameter("w_up", torch::zeros({n_expert, d_model, d_adapter}));
}

torch::Tensor AdapterExpertsImpl::forward(const torch::Tensor& z_sorted,
                                          const std::vector<int64_t>& offsets) {
  return adapters_reference(z_sorted, offsets, w_down, w_up, scale_);
}

}  // namespace moeforge
