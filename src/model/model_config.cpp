#include "moeforge/model/model_config.h"

#include "moeforge/config/binder.h"
#include "moeforge/util/error.h"

namespace moeforge {

void ModelConfig::validate() const {
  require_config(d_model >= 2, "model.d_model", "must be >= 2, got " + std::to_string(d_model));
  require_config(n_head >= 1, "model.n_head", "must be >= 1, got " + std::to_string(n_head));
  require_config(d_model % n_head == 0, "model.n_head",
                 "model.d_model = " + std::to_string(d_model) +
                     " is not divisible by n_head = " + std::to_string(n_head));
  require_config((d_model / n_head) % 2 == 0, "model.n_head",
                 "the head width d_model / n_head must be even (rotary pairs)");
  require_config(n_layer >= 1, "model.n_layer", "must be >= 1, got " + std::to_string(n_layer));
  require_config(d_ff >= 1, "model.d_ff", "must be >= 1, got " + std::to_string(d_ff));
  require_config(moe_every >= 0, "model.moe_every",
                 "must be >= 0 (0 = no MoE layers), got " + std::to_string(moe_every));
  require_config(rope_theta > 0, "model.rope_theta", "must be > 0");
  require_config(norm_eps > 0, "model.norm_eps", "must be > 0");
  require_config(vocab_size >= 2, "data.vocab_size", "the model needs a vocabulary of at least 2 tokens");
  require_config(max_seq_len >= 1, "data.seq_len", "must be >= 1");
}

void bind_model_config(ConfigBinder& b, ModelConfig* c) {
  b.bind("model.d_model", &c->d_model);
  b.bind("model.n_layer", &c->n_layer);
  b.bind("model.n_head", &c->n_head);
  b.bind("model.d_ff", &c->d_ff);
  b.bind("model.moe_every", &c->moe_every);
  b.bind("model.tie_embeddings", &c->tie_embeddings);
  b.bind("model.attn_bias", &c->attn_bias);
  b.bind("model.rope_theta", &c->rope_theta);
  b.bind("model.norm_eps", &c->norm_eps);
}

}  // namespace moeforge
