// A decoder-only transformer language model with MoE FFNs: token embedding, RMSNorm, rotary position
// embedding, causal multi-head attention, an MoELayer every model.moe_every layers and dense SwiGLU FFNs
// elsewhere, tied or untied output head.
//
// Legend: B sequences, S positions, C = d_model, H heads, D = C / H head width, V vocabulary.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "moeforge/layer/moe_layer.h"
#include "moeforge/model/model_config.h"
#include "moeforge/routing/moe_config.h"

namespace moeforge {

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;  // [C]

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

// Per-layer key/value cache for generation.
// One attention layer's keys and values: buffers [B, H, capacity, D] whose first `length` positions are
// filled. A new step's keys are written in place; the buffers grow by doubling, so a decode step copies
// only its own position, not the whole cache (docs/performance.md, "bf16 inference").
struct KVSlot {
  torch::Tensor k, v;
  int64_t length = 0;
  // Writes k_new/v_new [B, H, S, D] after the filled positions; returns the filled keys and values.
  std::pair<torch::Tensor, torch::Tensor> append(const torch::Tensor& k_new, const torch::Tensor& v_new);
};

struct KVCache {
  std::vector<KVSlot> kv;  // per layer
  // Per layer: what its router passed on for the next step (RoutingPlan::cache), which, like K and V,
  // summarises the positions already processed. Held, never read: the router defined it.
  std::vector<RouterStatePtr> route;
  int64_t length() const { return kv.empty() ? 0 : kv[0].length; }
};

class AttentionImpl : public torch::nn::Module {
 public:
  // bias: biases on the q, k, v projections (model.attn_bias, Qwen2).
  AttentionImpl(int64_t d_model, int64_t n_head, bool bias = false);
  // x [B, S, C]; cos/sin [S, D/2] for the positions of x; cache: the layer's keys and values (updated) or
  // null.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVSlot* cache);
  torch::Tensor w_qkv;  // [3C, C]
  torch::Tensor b_qkv;  // [3C] with model.attn_bias, else undefined
  torch::Tensor w_out;  // [C, C]

 private:
  int64_t n_head_;
};
TORCH_MODULE(Attention);

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelConfig& m, const MoEConfig& moe, bool is_moe);
  RMSNorm attn_norm{nullptr}, ffn_norm{nullptr};
  Attention attn{nullptr};
  MoELayer moe{nullptr};  // set when this block's FFN is MoE
  DenseFFN ffn{nullptr};  // otherwise
};
TORCH_MODULE(Block);

struct LMOutput {
  torch::Tensor logits;            // [B, S, V]
  torch::Tensor aux_loss;          // scalar: sum of the MoE layers' aux losses
  std::vector<RoutingPlan> plans;  // one per MoE layer, in layer order
};

class TransformerLMImpl : public torch::nn::Module {
 public:
  TransformerLMImpl(const ModelConfig& m, const MoEConfig& moe);

  // tokens [B, S] int64. ctx carries what routers need beyond the tokens (prompt lengths); training follows
  // is_training(). cache: for generation, positions continue after cache->length() and the cache is
  // extended (K, V and each router's state).
  LMOutput forward(const torch::Tensor& tokens, RouteContext ctx = {}, KVCache* cache = nullptr);

  // The per-token training loss [B*S] of the last training forward, for every MoE layer's feedback
  // (once per micro-batch, after its forward).
  void add_token_loss(const torch::Tensor& token_loss);
  // After the optimiser step: every router's state update from the step's feedback (moe_layer.h).
  void after_step();

  std::vector<MoELayer> moe_layers() const;
  const ModelConfig& model_config() const { return m_; }
  const MoEConfig& moe_config() const { return moe_; }

  torch::Tensor embedding;  // [V, C]
  torch::Tensor head;       // [V, C], only when not tied
  torch::nn::ModuleList blocks;
  RMSNorm final_norm{nullptr};

 private:
  ModelConfig m_;
  MoEConfig moe_;
  torch::Tensor rope_cos_, rope_sin_;  // [max_seq_len, D/2] (not state: recomputed from the config)
};
TORCH_MODULE(TransformerLM);

// Counts for `moeforge inspect`: total and active parameters, FLOPs per token (forward, matmuls only).
struct ModelCounts {
  int64_t total_params = 0;
  int64_t active_params = 0;  // per token: dense parts + K routed + shared experts + routers
  int64_t embedding_params = 0;
  double flops_per_token = 0;  // 2 * active matmul params + attention score/value FLOPs at max_seq_len
};
ModelCounts count_model(const TransformerLMImpl& model);

}  // namespace moeforge
