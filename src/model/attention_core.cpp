#include "moeforge/model/attention_core.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/attention.h"
#include "moeforge/layer/precision.h"

namespace moeforge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// The fused forward/backward as one autograd node (docs/performance.md, "Fused attention").
class CausalAttentionFn : public torch::autograd::Function<CausalAttentionFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& q_in, const torch::Tensor& k_in,
                               const torch::Tensor& v_in) {
    auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
    const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
    const float scale = float(1.0 / std::sqrt(double(D)));
    auto out = torch::empty_like(q);
    auto p = torch::empty({B, H, S, S}, q.options());
    const float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
    float *pp = p.data_ptr<float>(), *po = out.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> kt(static_cast<size_t>(D * S));
      for (int64_t bh = b0; bh < b1; ++bh)
        kernels::cpu::causal_attention_forward(pq + bh * S * D, pk + bh * S * D, pv + bh * S * D,
                                               pp + bh * S * S, po + bh * S * D, kt.data(), S, D, scale);
    });
    ctx->save_for_backward({q, k, v, p});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &p = saved[3];
    const auto dout = grads[0].contiguous();
    const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
    const float scale = float(1.0 / std::sqrt(double(D)));
    auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
    const float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
    const float *pp = p.data_ptr<float>(), *pg = dout.data_ptr<float>();
    float *pdq = dq.data_ptr<float>(), *pdk = dk.data_ptr<float>(), *pdv = dv.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(static_cast<size_t>(D * S + S * S));
      for (int64_t bh = b0; bh < b1; ++bh) {
        const int64_t o = bh * S * D;
        kernels::cpu::causal_attention_backward(pq + o, pk + o, pv + o, pp + bh * S * S, pg + o, pdq + o,
                                                pdk + o, pdv + o, scratch.data(), S, D, scale);
      }
    });
    return {dq, dk, dv};
  }
};

}  // namespace

torch::Tensor causal_attention_reference(const torch::Tensor& q, const torch::Tensor& k,
                                         const torch::Tensor& v, int64_t past) {
  const int64_t S = q.size(2), S_kv = k.size(2), D = q.size(3);
  auto att = torch::matmul(q, k.transpose(2, 3)) / std::sqrt(double(D));  // [B, H, S, S_kv]
  // Query i sits at absolute position past + i and sees keys 0..past + i: a decode step's one query sees
  // every key, and needs no mask.
  if (S == 1 && S_kv == past + 1) return torch::matmul(torch::softmax(att, -1), v);
  auto mask = torch::ones({S, S_kv}, torch::TensorOptions().dtype(torch::kBool).device(q.device()))
                  .triu(past + 1);  // [S, S_kv] true = future
  att = att.masked_fill(mask, -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(att, -1), v);  // [B, H, S, D]
}

// The reference's two products with bf16 operands (train.precision = "bf16", layer/precision.h): scores and
// the weighted sum of values as bf16 products widened to float32; the scaling, the mask and the softmax in
// float32. Autograd's casts carry the gradients back as float32.
torch::Tensor causal_attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t S = q.size(2), D = q.size(3);
  const auto b16 = torch::kBFloat16;
  auto att = torch::matmul(q.to(b16), k.to(b16).transpose(2, 3)).to(q.scalar_type()) / std::sqrt(double(D));
  auto mask = torch::ones({S, S}, torch::TensorOptions().dtype(torch::kBool).device(q.device())).triu(1);
  att = att.masked_fill(mask, -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(att, -1).to(b16), v.to(b16)).to(q.scalar_type());  // [B, H, S, D]
}

torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const bool fused = q.device().is_cpu() && q.scalar_type() == torch::kFloat &&
                     k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat &&
                     q.sizes() == k.sizes() && q.sizes() == v.sizes();
  if (!fused) return causal_attention_reference(q, k, v);
  if (matmul_precision() == MatmulPrecision::kBFloat16) return causal_attention_bf16(q, k, v);
  return CausalAttentionFn::apply(q, k, v);
}

}  // namespace moeforge
