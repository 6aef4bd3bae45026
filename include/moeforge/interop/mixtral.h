// The "Mixtral form" of a model: what both export formats (GGUF's llama architecture with experts and
// Hugging Face's MixtralForCausalLM) can express, and what `moeforge import` reads into. Every layer has
// RMSNorm, causal multi-head attention (grouped-query allowed) with rotary embedding, RMSNorm and a
// SwiGLU MoE FFN whose gates are softmax over all experts, top-K, renormalised over the K (docs/interop.md).
//
// Tensors are kept in moeforge's (= Hugging Face's) conventions: row-major [out, in] weights, half-split
// RoPE pairs (i, i + D/2). Each writer converts from there (GGUF: Q/K rows permuted, ne reversed).
//
// Legend: V vocabulary, C model width, H heads, Hkv key/value heads, D = C / H, E experts, F expert width.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

namespace moeforge {

struct LoadedModel;

struct MixtralLayer {
  torch::Tensor attn_norm;             // [C]
  torch::Tensor wq, wk, wv, wo;        // [H*D, C], [Hkv*D, C], [Hkv*D, C], [C, H*D]
  torch::Tensor ffn_norm;              // [C]
  torch::Tensor router;                // [E, C]
  torch::Tensor w_gate, w_up, w_down;  // [E, F, C], [E, F, C], [E, C, F]
};

struct MixtralModel {
  int64_t vocab_size = 0, d_model = 0, n_head = 0, n_kv_head = 0, d_ff = 0, n_expert = 0, n_expert_used = 0;
  int64_t context = 0;  // trained context length (max_seq_len)
  double rope_theta = 10000.0, norm_eps = 1e-5;
  torch::Tensor embedding;   // [V, C]
  torch::Tensor final_norm;  // [C]
  torch::Tensor head;        // [V, C]; undefined when tied to the embedding
  std::vector<MixtralLayer> layers;
  std::string tokenizer_model;     // serialized SentencePiece model
  std::vector<std::string> notes;  // the conversions applied, one line each (printed by `export`)
  int64_t n_layer() const { return static_cast<int64_t>(layers.size()); }
  int64_t head_dim() const { return d_model / n_head; }
};

// Test-only switches that turn off a conversion, for the negative controls of the interop tests: with
// either one off the exported model computes something else, and the tests must see it.
struct MixtralExportOptions {
  bool allow_unnormalized_gates = false;  // export a topk router with moe.renormalize=false anyway
};

// The Mixtral form of a loaded moeforge model, for `format` ("gguf" or "hf", named in errors). Throws
// ConfigError naming the config key, the router and the format when the model computes something the form
// cannot express: routers other than topk, loss_free and bip (causal) with a zero selection bias / dual;
// sigmoid scores; un-renormalised gates; capacity limits; shared experts; GELU or adapter experts; pruned
// experts. Dense layers (model.moe_every > 1) become E identical experts under a zero router, and experts
// narrower than the dense FFN are zero-padded (both exact; docs/interop.md says why).
MixtralModel to_mixtral(const LoadedModel& lm, const std::string& format,
                        const MixtralExportOptions& opt = {});

// Checks every tensor's shape against the dimensions; FileError(where, ...) names the first one that
// disagrees (import uses it on what it read).
void check_mixtral_shapes(const MixtralModel& m, const std::string& where);

}  // namespace moeforge
