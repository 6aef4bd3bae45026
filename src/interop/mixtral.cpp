#include "moeforge/interop/mixtral.h"

#include "moeforge/model/load.h"
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
  if (m.attn_bias)
    throw ConfigError("model.attn_bias", "q, k, v biases (an imported Qwen2-MoE model); " + fmt +
                                             " as moeforge writes it has none (docs/interop.md)");
  if (any_moe) {
    if (moe.shared_gate) throw unsupported("moe.shared_gate", "sigmoid-gated shared experts (Qwen2-MoE)");
    if (moe.score != ScoreFunc::kSoftmax)
      throw unsupported("moe.score", "sigmoid gates sigma(z_i) / sum sigma(z_j) are not softmax gates");
    if (moe.capacity_factor > 0)
      throw unsupported("moe.capacity_factor", "a capacity drops tokens depending on the batch");
    // Since session 4 a single choice keeps g = p (Switch; docs/routing.md section 1). Mixtral-form formats
    // renormalise the top-K weights, which would make a K = 1 gate the constant 1; GGUF has llama.cpp's
    // deepseek architecture, whose gates are the probabilities themselves, and which has shared experts.
    const bool needs_deepseek = moe.routed_used() == 1 || !moe.renormalize || moe.n_shared_expert > 0;
    if (needs_deepseek && !opt.allow_unnormalized_gates) {
      if (format == "gguf" && (moe.renormalize && moe.routed_used() > 1))
        throw unsupported("moe.n_shared_expert",
                          "shared experts with gates renormalised over the top-K (llama.cpp's deepseek "
                          "architecture has shared experts but does not renormalise; train with "
                          "moe.renormalize=false, DeepSeekMoE's gating, to export)");
      if (format != "gguf") {
        if (moe.routed_used() == 1)
          throw unsupported("moe.n_expert_used",
                            "K = 1 gates are the chosen probability p, which the format renormalises to 1 "
                            "(the gguf format can: llama.cpp's deepseek architecture)");
        if (!moe.renormalize)
          throw unsupported(
              "moe.renormalize",
              "gates p_i not renormalised over the top-K (Switch style); the format renormalises "
              "(the gguf format can: llama.cpp's deepseek architecture)");
        throw unsupported("moe.n_shared_expert",
                          "shared experts (the gguf format writes them: llama.cpp's deepseek architecture)");
      }
      out.form = "deepseek";
    }
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
  const bool deepseek = out.form == "deepseek";
  // Every layer gets E experts of width F. Mixtral form: the MoE experts' width or the dense FFN's,
  // whichever is wider (dense layers become experts). Deepseek form: the MoE experts' width.
  const int64_t E = any_moe ? moe.routed_experts() : 1;
  const int64_t K = any_moe ? moe.routed_used() : 1;
  int64_t F = any_moe ? moe.routed_width() : 0;
  bool has_dense = false;
  int64_t n_lead = 0;  // leading dense layers (deepseek's leading_dense_block_count)
  for (int64_t i = 0; i < m.n_layer; ++i) {
    if (!m.is_moe_layer(i)) has_dense = true;
    if (!m.is_moe_layer(i) && n_lead == i) ++n_lead;
  }
  const bool inner_dense = n_lead < m.n_layer && [&] {
    for (int64_t i = n_lead; i < m.n_layer; ++i)
      if (!m.is_moe_layer(i)) return true;
    return false;
  }();
  if (has_dense && !deepseek) F = std::max(F, m.d_ff);
  // Deepseek form: the shared FFN is Fs = n_shared * F wide in every MoE layer (llama.cpp has one width for
  // all layers). A dense layer after the first MoE layer is written as that shared FFN (zero-padded) with
  // zero routed experts, so Fs must hold d_ff; a model without shared experts gets a zero one (it adds 0).
  int64_t n_shared = 0;
  if (deepseek) {
    n_shared = moe.n_shared_expert * moe.expert_split;  // K_s experts of width d_expert = split * F
    if (inner_dense) n_shared = std::max(n_shared, (m.d_ff + F - 1) / F);
    n_shared = std::max<int64_t>(n_shared, 1);
    out.n_shared = n_shared;
    out.n_dense_lead = n_lead;
    out.d_ff_dense = n_lead > 0 ? m.d_ff : 0;
  }
  const int64_t Fs = n_shared * F;
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
      if (deepseek) {
        if (blk->moe->shared) {
          L.sh_gate = pad_dim(f32(blk->moe->shared->w_gate), 0, Fs);
          L.sh_up = pad_dim(f32(blk->moe->shared->w_up), 0, Fs);
          L.sh_down = pad_dim(f32(blk->moe->shared->w_down), 1, Fs);
        } else {
          L.sh_gate = torch::zeros({Fs, C});
          L.sh_up = torch::zeros({Fs, C});
          L.sh_down = torch::zeros({C, Fs});
        }
      }
    } else if (deepseek && i < n_lead) {
      L.dense = true;
      L.dense_gate = f32(blk->ffn->w_gate);
      L.dense_up = f32(blk->ffn->w_up);
      L.dense_down = f32(blk->ffn->w_down);
    } else if (deepseek) {
      // A dense layer between MoE layers: its FFN as the shared expert, every routed expert zero (their
      // gated outputs are exactly 0, whichever the zero router picks).
      L.sh_gate = pad_dim(f32(blk->ffn->w_gate), 0, Fs);
      L.sh_up = pad_dim(f32(blk->ffn->w_up), 0, Fs);
      L.sh_down = pad_dim(f32(blk->ffn->w_down), 1, Fs);
      L.router = torch::zeros({E, C});
      L.w_gate = torch::zeros({E, F, C});
      L.w_up = torch::zeros({E, F, C});
      L.w_down = torch::zeros({E, C, F});
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
    out.notes.push_back(
        "router '" + moe.router + "' exported as softmax top-" + std::to_string(K) +
        (deepseek ? " with the probabilities as gates (llama.cpp's deepseek architecture)" : "") +
        " (with any selection state at zero, that is exactly what it computes)");
  if (any_moe && moe.routed_width() < F)
    out.notes.push_back("experts zero-padded from width " + std::to_string(moe.routed_width()) + " to " +
                        std::to_string(F) + " (the padding adds silu(0) * 0 = 0)");
  if (deepseek) {
    if (n_lead > 0) out.notes.push_back(std::to_string(n_lead) + " leading dense layer(s) written as such");
    if (inner_dense)
      out.notes.push_back(
          "dense layers after the first MoE layer written as the shared FFN with zero routed "
          "experts (they add exactly 0)");
    if (moe.n_shared_expert * moe.expert_split != n_shared)
      out.notes.push_back("shared FFN written " + std::to_string(Fs) +
                          " wide (llama.cpp has one width for all "
                          "layers; zero padding adds 0)");
  } else if (has_dense) {
    out.notes.push_back("dense layers written as " + std::to_string(E) +
                        " identical experts under a zero router (gates 1/K each: the same function)");
  }
  check_mixtral_shapes(out, lm.dir);
  return out;
}

}  // namespace moeforge
