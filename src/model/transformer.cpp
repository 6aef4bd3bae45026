#include "moeforge/model/transformer.h"

#include <algorithm>
#include <cmath>

#include "moeforge/layer/precision.h"
#include "moeforge/model/attention_core.h"
#include "moeforge/model/norm.h"

namespace moeforge {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  return rms_norm(x, weight, eps_);  // fused on the CPU, its plain twin elsewhere (model/norm.h)
}

AttentionImpl::AttentionImpl(int64_t d_model, int64_t n_head, bool bias) : n_head_(n_head) {
  w_qkv = register_parameter("w_qkv", torch::randn({3 * d_model, d_model}) * 0.02);
  if (bias) b_qkv = register_parameter("b_qkv", torch::zeros({3 * d_model}));
  w_out = register_parameter("w_out", torch::randn({d_model, d_model}) * 0.02);
}

namespace {
// Rotary embedding, half-split convention (GPT-NeoX / Llama in Hugging Face): the first and second halves
// of each head's D dimensions form the rotated pairs. x [B, H, S, D], cos/sin [S, D/2].
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  return torch::cat({x1 * cos - x2 * sin, x1 * sin + x2 * cos}, -1);
}
}  // namespace

std::pair<torch::Tensor, torch::Tensor> KVSlot::append(const torch::Tensor& k_new,
                                                       const torch::Tensor& v_new) {
  const int64_t S = k_new.size(2), need = length + S;
  if (!k.defined() || k.size(2) < need) {
    const int64_t cap = std::max({need, k.defined() ? 2 * k.size(2) : int64_t{0}, int64_t{64}});
    auto sizes = k_new.sizes().vec();
    sizes[2] = cap;
    auto k2 = torch::empty(sizes, k_new.options()), v2 = torch::empty(sizes, v_new.options());
    if (length > 0) {
      k2.narrow(2, 0, length).copy_(k.narrow(2, 0, length));
      v2.narrow(2, 0, length).copy_(v.narrow(2, 0, length));
    }
    k = k2;
    v = v2;
  }
  k.narrow(2, length, S).copy_(k_new);
  v.narrow(2, length, S).copy_(v_new);
  length = need;
  return {k.narrow(2, 0, length), v.narrow(2, 0, length)};
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                     const torch::Tensor& sin, KVSlot* cache) {
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2), H = n_head_, D = C / H;
  // The projections in the precision in force (layer/precision.h); the attention core stays float32.
  auto qkv = linear_mp(x, w_qkv, b_qkv).view({B, S, 3, H, D});      // [B, S, 3, H, D]
  auto q = apply_rope(qkv.select(2, 0).transpose(1, 2), cos, sin);  // [B, H, S, D]
  auto k = apply_rope(qkv.select(2, 1).transpose(1, 2), cos, sin);  // [B, H, S, D]
  auto v = qkv.select(2, 2).transpose(1, 2);                        // [B, H, S, D]
  int64_t past = 0;
  if (cache) {
    past = cache->length;
    auto [k_all, v_all] = cache->append(k, v);
    if (past > 0) {  // the first pass attends over its own k and v, contiguous, in the fused kernel
      k = k_all;
      v = v_all;
    }
  }
  // The fused CPU attention when there are no past positions (training, evaluation, a prompt's first
  // pass); its plain twin with a KV cache (docs/performance.md, "Fused attention").
  auto y = past == 0 ? causal_attention(q, k, v) : causal_attention_reference(q, k, v, past);  // [B, H, S, D]
  y = y.transpose(1, 2).reshape({B, S, C});
  return linear_mp(y, w_out);
}

BlockImpl::BlockImpl(const ModelConfig& m, const MoEConfig& moe_cfg, bool is_moe) {
  attn_norm = register_module("attn_norm", RMSNorm(m.d_model, m.norm_eps));
  attn = register_module("attn", Attention(m.d_model, m.n_head, m.attn_bias));
  ffn_norm = register_module("ffn_norm", RMSNorm(m.d_model, m.norm_eps));
  if (is_moe)
    moe = register_module("moe", MoELayer(moe_cfg, m.d_model));
  else
    ffn = register_module("ffn", DenseFFN(m.d_model, m.d_ff, ExpertAct::kSwiGLU));
}

TransformerLMImpl::TransformerLMImpl(const ModelConfig& m, const MoEConfig& moe_cfg) : m_(m), moe_(moe_cfg) {
  embedding = register_parameter("embedding", torch::randn({m.vocab_size, m.d_model}) * 0.02);
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < m.n_layer; ++i) blocks->push_back(Block(m_, moe_, m_.is_moe_layer(i)));
  final_norm = register_module("final_norm", RMSNorm(m.d_model, m.norm_eps));
  if (!m.tie_embeddings) head = register_parameter("head", torch::randn({m.vocab_size, m.d_model}) * 0.02);
  // Rotary tables: angle(pos, i) = pos * theta^(-2i / D).
  const int64_t D = m.d_model / m.n_head;
  auto inv_freq = torch::pow(m.rope_theta, -torch::arange(0, D, 2, torch::kDouble) / double(D));  // [D/2]
  auto angles = torch::outer(torch::arange(m.max_seq_len, torch::kDouble), inv_freq);             // [S, D/2]
  rope_cos_ = angles.cos();  // float64: cast to the activations' dtype at use
  rope_sin_ = angles.sin();
}

LMOutput TransformerLMImpl::forward(const torch::Tensor& tokens, RouteContext ctx, KVCache* cache) {
  const int64_t B = tokens.size(0), S = tokens.size(1);
  const int64_t past = cache ? cache->length() : 0;
  TORCH_CHECK(past + S <= m_.max_seq_len, "sequence of ", past + S, " tokens exceeds model max_seq_len ",
              m_.max_seq_len);
  if (cache && cache->kv.empty()) {
    cache->kv.resize(m_.n_layer);
    cache->route.resize(m_.n_layer);
  }
  // Profiling scopes (moeforge::..., RECORD_USER_SCOPE): free unless a profiler listens; `moeforge bench
  // --profile` sums a training step by them (docs/performance.md, "Where a training step goes").
  torch::Tensor x;
  {
    RECORD_USER_SCOPE("moeforge::embedding");
    x = embedding.index_select(0, tokens.reshape(-1)).view({B, S, m_.d_model});  // [B, S, C]
    // bf16-stored weights (model/inference_precision.h): the residual stream stays float32.
    if (x.scalar_type() == torch::kBFloat16) x = x.to(torch::kFloat);
  }
  auto cos = rope_cos_.narrow(0, past, S).to(x.device(), x.scalar_type());  // [S, D/2]
  auto sin = rope_sin_.narrow(0, past, S).to(x.device(), x.scalar_type());
  LMOutput out;
  out.aux_loss = torch::zeros({}, x.options());
  ctx.n_seq = B;
  ctx.seq_len = S;
  ctx.training = is_training();
  for (int64_t i = 0; i < m_.n_layer; ++i) {
    auto* blk = blocks[i]->as<BlockImpl>();
    torch::Tensor a, h;
    {
      RECORD_USER_SCOPE("moeforge::norm");
      a = blk->attn_norm->forward(x);
    }
    {
      RECORD_USER_SCOPE("moeforge::attention");
      a = blk->attn->forward(a, cos, sin, cache ? &cache->kv[i] : nullptr);
    }
    x = x + a;
    {
      RECORD_USER_SCOPE("moeforge::norm");
      h = blk->ffn_norm->forward(x);  // [B, S, C]
    }
    if (blk->moe) {
      // Router state (docs/routing.md, "Router state"): this layer's own from the last generation step, and
      // what the previous MoE layer's router passed on; both opaque here.
      ctx.cache = cache ? cache->route[i] : nullptr;
      auto r = blk->moe->forward(h, ctx);
      ctx.carry = r.plan.carry;
      if (cache) cache->route[i] = r.plan.cache;
      out.aux_loss = out.aux_loss + r.plan.aux_loss;
      out.plans.push_back(std::move(r.plan));
      x = x + r.y;
    } else {
      {
        RECORD_USER_SCOPE("moeforge::dense_ffn");
        h = blk->ffn->forward(h);
      }
      x = x + h;
    }
  }
  {
    RECORD_USER_SCOPE("moeforge::norm");
    x = final_norm->forward(x);
  }
  RECORD_USER_SCOPE("moeforge::output_projection");
  out.logits = linear_mp(x, m_.tie_embeddings ? embedding : head);  // [B, S, V], float32 (precision.h)
  return out;
}

void TransformerLMImpl::add_token_loss(const torch::Tensor& token_loss) {
  for (auto& l : moe_layers()) l->add_token_loss(token_loss);
}

void TransformerLMImpl::after_step() {
  for (auto& l : moe_layers()) l->after_step();
}

std::vector<MoELayer> TransformerLMImpl::moe_layers() const {
  std::vector<MoELayer> out;
  for (const auto& b : *blocks) {
    auto* blk = b->as<BlockImpl>();
    if (blk->moe) out.push_back(blk->moe);
  }
  return out;
}

ModelCounts count_model(const TransformerLMImpl& model) {
  ModelCounts c;
  const auto& m = model.model_config();
  const auto& moe = model.moe_config();
  int64_t routed = 0;
  for (const auto& p : model.named_parameters()) {
    c.total_params += p.value().numel();
    if (p.key().find(".experts.") != std::string::npos) routed += p.value().numel();
  }
  c.embedding_params = model.embedding.numel();
  const double share = double(moe.routed_used()) / double(moe.routed_experts());
  c.active_params = c.total_params - routed + static_cast<int64_t>(std::llround(share * double(routed)));
  // Matmul FLOPs: 2 per multiply-add over every active weight except the embedding lookup (the tied head
  // re-uses it as a matmul), plus attention scores and values: 2 * 2 * S * C per layer at full context.
  const double matmul_params =
      double(c.active_params - c.embedding_params) + double(m.vocab_size * m.d_model);
  c.flops_per_token =
      2.0 * matmul_params + 4.0 * double(m.max_seq_len) * double(m.d_model) * double(m.n_layer);
  return c;
}

}  // namespace moeforge
