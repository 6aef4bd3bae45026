// Stage 3, adapter form (PESC / Camelidae sparse upcycling, docs/routing.md section 6): every expert
// is a bottleneck adapter A_e(z) = lambda * W_up,e gelu(W_down,e z) applied to the output z = FFN(x) of one
// frozen dense FFN. MoELayer computes z once per token, dispatches z (not x) to the adapters and adds z back:
//   y_t = FFN(x_t) + sum_{(t,e,g)} g * A_e(FFN(x_t)).
// The adapters keep the experts' stage contract: rows already grouped by expert, [N, C] + offsets [E+1].
//
// Legend: N rows (assignments), C model width, A adapter width, E experts.
#pragma once

#include <torch/torch.h>

#include <vector>

namespace moeforge {

// The plain loop, one adapter per expert: z_sorted [N, C], offsets [E+1] -> [N, C].
torch::Tensor adapters_reference(const torch::Tensor& z_sorted, const std::vector<int64_t>& offsets,
                                 const torch::Tensor& w_down, const torch::Tensor& w_up, double scale);

class AdapterExpertsImpl : public torch::nn::Module {
 public:
  AdapterExpertsImpl(int64_t n_expert, int64_t d_model, int64_t d_adapter, double scale);
  torch::Tensor forward(const torch::Tensor& z_sorted, const std::vector<int64_t>& offsets);

  torch::Tensor w_down;  // [E, A, C], nn.Linear initialisation
  torch::Tensor w_up;    // [E, C, A], zero at start: the upcycled layer starts as the dense FFN (PESC)

 private:
  double scale_;
};
TORCH_MODULE(AdapterExperts);

}  // namespace moeforge
