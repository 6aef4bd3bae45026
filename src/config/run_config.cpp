#include "moeforge/config/run_config.h"

#include "moeforge/util/error.h"
#include "moeforge_default_config.h"  // generated from configs/default.toml

namespace moeforge {

void bind_run_config(ConfigBinder& b, RunConfig* c) {
  b.bind("model.d_model", &c->model.d_model);
  b.bind("model.n_layer", &c->model.n_layer);
  b.bind("model.n_head", &c->model.n_head);
  b.bind("model.d_ff", &c->model.d_ff);
  b.bind("model.moe_every", &c->model.moe_every);
  b.bind("model.tie_embeddings", &c->model.tie_embeddings);
  b.bind("model.attn_bias", &c->model.attn_bias);
  b.bind("model.rope_theta", &c->model.rope_theta);
  b.bind("model.norm_eps", &c->model.norm_eps);
  bind_moe_config(b, &c->moe);
  b.bind("train.steps", &c->train.steps);
  b.bind("train.batch_size", &c->train.batch_size);
  b.bind("train.grad_accum", &c->train.grad_accum);
  b.bind("train.lr", &c->train.lr);
  b.bind("train.min_lr_ratio", &c->train.min_lr_ratio);
  b.bind("train.warmup", &c->train.warmup);
  b.bind("train.weight_decay", &c->train.weight_decay);
  b.bind("train.beta1", &c->train.beta1);
  b.bind("train.beta2", &c->train.beta2);
  b.bind("train.adam_eps", &c->train.adam_eps);
  b.bind("train.grad_clip", &c->train.grad_clip);
  b.bind("train.eval_every", &c->train.eval_every);
  b.bind("train.eval_batches", &c->train.eval_batches);
  b.bind("train.log_every", &c->train.log_every);
  b.bind("train.checkpoint_every", &c->train.checkpoint_every);
  b.bind("train.keep_checkpoints", &c->train.keep_checkpoints);
  b.bind("train.seed", &c->train.seed);
  b.bind("train.nan_policy", &c->train.nan_policy);
  b.bind("train.threads", &c->train.threads);
  bind_data_config(b, &c->data);
  b.bind("dist.expert_parallel", &c->moe.expert_parallel);  // docs/distributed.md
}

void RunConfig::validate() const {
  moe.validate();
  train.validate();
  data.validate();
  // MoCE's prompt pool needs a prompt per row: instruction samples, one per sequence.
  if (moe.router == "moce" && moe.moce_pool == MocePool::kPrompt &&
      (data.corpus != "instruct" || data.instruct_pack))
    throw ConfigError("moe.moce_pool",
                      "\"prompt\" pools each sequence's prompt: it needs data.corpus = \"instruct\" and "
                      "data.instruct_pack = false (one sample per sequence)");
  // vocab_size and max_seq_len come from the data; check the rest of the model section with stand-ins.
  ModelConfig m = model;
  m.vocab_size = std::max<int64_t>(m.vocab_size, data.vocab_size);
  m.max_seq_len = std::max<int64_t>(m.max_seq_len, data.seq_len);
  m.validate();
}

std::string RunConfig::to_toml() const {
  ConfigBinder b;
  bind_run_config(b, const_cast<RunConfig*>(this));
  return b.to_toml();
}

const std::string& default_config_text() {
  static const std::string text = kMoeforgeDefaultConfig;
  return text;
}

RunConfig load_run_config_text(const std::string& text, const std::string& where,
                               const std::vector<std::string>& overrides) {
  RunConfig c;
  ConfigBinder b;
  bind_run_config(b, &c);
  b.apply_text(text, where);
  for (auto& o : overrides) b.apply_override(o);
  c.validate();
  return c;
}

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty())
    return load_run_config_text(default_config_text(), "configs/default.toml (embedded)", overrides);
  RunConfig c;
  ConfigBinder b;
  bind_run_config(b, &c);
  b.apply_file(path);
  for (auto& o : overrides) b.apply_override(o);
  c.validate();
  return c;
}

}  // namespace moeforge
