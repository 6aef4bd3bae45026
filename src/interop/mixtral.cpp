#include "moeforge/interop/mixtral.h"

#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"

namespace moeforge {
namespace {

torch::Tensor f32(const torch::Tensor& t) {
  return t.detach().to(torch::kCPU, torch::kFloat).contiguous();
}

// [rows, cols] weight zero-padded to `rows` rows (dim 0) or `cols` columns (dim 1) of a stacked [E, ., .].
torch::Tensor pad_dim(const torch::Tensor& w, int64_t dim, int64_t size) {
  if (w.size(dim) == size) return w;
  auto shape = w.sizes().vec();
  shape[dim] = size;
  auto out = torch::zeros(shape, w.options());
  out.narrow(dim, 0, w.size(dim)).copy_(w);
  return out;
}

}  // namespace

MixtralModel to_mixtral(const LoadedModel& lm, const std::string& format, const MixtralExportOptions& opt) {
  const auto& m = lm.cfg.model;
  const auto& moe = lm.cfg.moe;
  const std::string fmt = "the " + format + " format";
  auto unsupported = [&](const std::string& key, const std::string& what) {
    return ConfigError(key, "router '" + moe.router + "': " + what + "; " + fmt +
                                " cannot express it (docs/interop.md lists what exports)");
  };
  const bool any_moe = [&] {
    for (int64_t i = 0; i < m.n_layer; ++i)
      if (m.is_moe_layer(i)) return true;
    return false;
  }();
  MixtralModel out;
  if (any_moe) {
    if (moe.score != ScoreFunc::kSoftmax)
      throw unsupported("moe.score", "sigmoid gates sigma(z_i) / sum sigma(z_j) are not softmax gates");
    // Since session 4 a single choice keeps g = p (Switch; docs/routing.md section 1); the format
    // renormalises the top-K weights, which makes a K = 1 gate the constant 1.
    if (moe.routed_used() == 1 && !opt.allow_unnormalized_gates)
      throw unsupported("moe.n_expert_used",
                        "K = 1 gates are the chosen probability p, which the format renormalises to 1");
    if (!moe.renormalize && !opt.allow_unnormalized_gates)
      throw unsupported("moe.renormalize",
                        "gates p_i not renormalised over the top-K (Switch style); the format renormalises");
    if (moe.capacity_factor > 0)
      throw unsupported("moe.capacity_factor", "a capacity drops tokens depending on the batch");
    if (moe.n_shared_expert > 0)
      throw unsupported("moe.n_shared_expert", "shared experts (the deepseek architecture is not written)");
    if (moe.expert_act != ExpertAct::kSwiGLU)
      throw unsupported("moe.expert_act", "GELU experts; the format's experts are SwiGLU");
    if (moe.expert_form != ExpertForm::kFFN)
      throw unsupported("moe.expert_form", "adapter experts on a frozen dense FFN");
  }
  out.vocab_size = m.vocab_size;
  out.d_model = m.d_model;
  out.n_head = out.n_kv_head = m.n_head;
  out.context = m.max_seq_len;
  out.rope_theta = m.rope_theta;
  out.norm_eps = m.norm_eps;
  out.tokenizer_model = lm.tokenizer->serialized();
  const int64_t C = m.d_model;
  // Every layer gets E experts of width F: the MoE experts' width or the dense FFN's, whichever is wider.
  const int64_t E = any_moe ? moe.routed_experts() : 1;
  const int64_t K = any_moe ? moe.routed_used() : 1;
  int64_t F = any_moe ? moe.routed_width() : 0;
  bool has_dense = false;
  for (int64_t i = 0; i < m.n_layer; ++i)
    if (!m.is_moe_layer(i)) has_dense = true;
  if (has_dense) F = std::max(F, m.d_ff);
  out.n_expert = E;
  out.n_expert_used = K;
  out.d_ff = F;
  torch::NoGradGuard ng;
  TransformerLM model = lm.model;  // a non-const handle on the same module
  out.embedding = f32(model->embedding);
  out.final_norm = f32(model->final_norm->weight);
  if (!m.tie_embeddings) out.head = f32(model->head);
  for (int64_t i = 0; i < m.n_layer; ++i) {
    auto* blk = model->blocks[i]->as<BlockImpl>();
    MixtralLayer L;
    L.attn_norm = f32(blk->attn_norm->weight);
    L.ffn_norm = f32(blk->ffn_norm->weight);
    auto qkv = f32(blk->attn->w_qkv);  // [3C, C]: q, k, v rows
    L.wq = qkv.narrow(0, 0, C).contiguous();
    L.wk = qkv.narrow(0, C, C).contiguous();
    L.wv = qkv.narrow(0, 2 * C, C).contiguous();
    L.wo = f32(blk->attn->w_out);
    if (blk->moe) {
      const auto& router = *blk->moe->router;
      if (!router.pruned_experts().empty())
        throw unsupported("moe.router", "layer " + std::to_string(i) +
                                            " has pruned experts (moeforge prune); the format routes to all");
      // The router says whether it is plain top-K of its "weight" now (Router::top_k_obstacle, state
      // included: loss-free's bias and BIP's dual must be zero).
      if (const std::string why = router.top_k_obstacle(); !why.empty()) {
        const auto colon = why.find(':');
        throw unsupported(why.substr(0, colon), "layer " + std::to_string(i) + ": " + why.substr(colon + 2));
      }
      auto w = blk->moe->experts->weights();
      L.router = f32(router.named_parameters(false)["weight"]);
      L.w_gate = pad_dim(f32(w.w_gate), 1, F);
      L.w_up = pad_dim(f32(w.w_up), 1, F);
      L.w_down = pad_dim(f32(w.w_down), 2, F);
    } else {
      // A dense SwiGLU FFN as E identical experts: the zero router gives every expert the same score, so any
      // K are chosen with renormalised gates 1/K each, and K copies of 1/K * y sum to y.
      auto pad_g = pad_dim(f32(blk->ffn->w_gate), 0, F), pad_u = pad_dim(f32(blk->ffn->w_up), 0, F);
      auto pad_d = pad_dim(f32(blk->ffn->w_down), 1, F);
      L.router = torch::zeros({E, C});
      L.w_gate = pad_g.unsqueeze(0).expand({E, F, C}).contiguous();
      L.w_up = pad_u.unsqueeze(0).expand({E, F, C}).contiguous();
      L.w_down = pad_d.unsqueeze(0).expand({E, C, F}).contiguous();
    }
    out.layers.push_back(std::move(L));
  }
  if (any_moe)
    out.notes.push_back("router '" + moe.router + "' exported as softmax top-" + std::to_string(K) +
                        " (with any selection state at zero, that is exactly what it computes)");
  if (any_moe && moe.routed_width() < F)
    out.notes.push_back("experts zero-padded from width " + std::to_string(moe.routed_width()) + " to " +
                        std::to_string(F) + " (the padding adds silu(0) * 0 = 0)");
  if (has_dense)
    out.notes.push_back("dense layers written as " + std::to_string(E) +
                        " identical experts under a zero router (gates 1/K each: the same function)");
  check_mixtral_shapes(out, lm.dir);
  return out;
}

}  // namespace moeforge
