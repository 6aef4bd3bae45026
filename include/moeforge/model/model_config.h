// The [model] section: the transformer's shape (docs/architecture.md, "Config sections": a section header
// includes nothing of moeforge).
#pragma once

#include <cstdint>

namespace moeforge {

struct ModelConfig {
  int64_t d_model = 128;        // model.d_model: C
  int64_t n_layer = 4;          // model.n_layer
  int64_t n_head = 4;           // model.n_head
  int64_t d_ff = 344;           // model.d_ff: hidden width of the dense SwiGLU FFNs
  int64_t moe_every = 1;        // model.moe_every: layer i has an MoE FFN when (i + 1) % moe_every == 0
  bool tie_embeddings = true;   // model.tie_embeddings: output head = token embedding^T
  bool attn_bias = false;       // model.attn_bias: biases on the q, k, v projections (Qwen2; docs/interop.md)
  double rope_theta = 10000.0;  // model.rope_theta
  double norm_eps = 1e-5;       // model.norm_eps: RMSNorm epsilon
  int64_t vocab_size = 0;       // set from the tokenizer (data.vocab_size), not a config key
  int64_t max_seq_len = 0;      // set from data.seq_len, not a config key
  void validate() const;
  bool is_moe_layer(int64_t i) const { return moe_every > 0 && (i + 1) % moe_every == 0; }
};

class ConfigBinder;
// Registers every [model] key of `cfg` under "model.<key>".
void bind_model_config(ConfigBinder& binder, ModelConfig* cfg);

}  // namespace moeforge
