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
  torch::Tensor router;                // [E, C]; undefined in a leading dense layer (deepseek form)
  torch::Tensor w_gate, w_up, w_down;  // [E, F, C], [E, F, C], [E, C, F]; undefined in a leading dense layer
  // deepseek form only: the shared experts merged into one SwiGLU FFN of width Fs = n_shared * F
  // ([Fs, C], [Fs, C], [C, Fs]), and in a leading dense layer its FFN ([d_ff_dense, C], ..., [C,
  // d_ff_dense]).
  torch::Tensor sh_gate, sh_up, sh_down;
  torch::Tensor dense_gate, dense_up, dense_down;
  bool dense = false;  // a dense FFN layer (dense_*), no router or experts
  // Read from qwen2_moe folders only (moeforge import): q, k, v biases ([H*D], [Hkv*D], [Hkv*D]) and the
  // shared experts' sigmoid gate [1, C].
  torch::Tensor bq, bk, bv, sh_gate_w;
};

struct MixtralModel {
  int64_t vocab_size = 0, d_model = 0, n_head = 0, n_kv_head = 0, d_ff = 0, n_expert = 0, n_expert_used = 0;
  int64_t context = 0;  // trained context length (max_seq_len)
  double rope_theta = 10000.0, norm_eps = 1e-5;
  torch::Tensor embedding;   // [V, C]
  torch::Tensor final_norm;  // [C]
  torch::Tensor head;        // [V, C]; undefined when tied to the embedding
  std::vector<MixtralLayer> layers;
  // "mixtral": every layer MoE, gates renormalised over the top-K (GGUF llama architecture, HF Mixtral).
  // "deepseek" (GGUF only; llama.cpp's deepseek architecture, DeepSeekMoE): gates are the top-K softmax
  // probabilities themselves (not renormalised), n_shared ungated shared experts of width F in every MoE
  // layer, and the first n_dense_lead layers dense FFNs of width d_ff_dense.
  // "qwen2_moe" (read by import only): q/k/v biases, n_shared shared experts of width F behind a sigmoid
  // gate, gates renormalised or not (norm_topk), dense layers of width d_ff_dense where not MoE.
  std::string form = "mixtral";
  bool norm_topk = true;
  int64_t n_shared = 0, n_dense_lead = 0, d_ff_dense = 0;
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

// The Mixtral form of a loaded moeforge model, for `format` ("gguf" or "hf", named in errors). For gguf,
// a model with shared experts, un-renormalised gates or K = 1 gets the deepseek form instead (docs/interop.md
// says how dense layers and missing shared experts are written there, exactly). Throws
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
