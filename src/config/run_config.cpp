#include "moeforge/config/run_config.h"

#include <algorithm>

#include "moeforge/util/error.h"
#include "moeforge_default_config.h"  // generated from configs/default.toml

namespace moeforge {

void bind_run_config(ConfigBinder& b, RunConfig* c) {
  bind_model_config(b, &c->model);
  bind_moe_config(b, &c->moe);
  bind_train_config(b, &c->train);
  bind_data_config(b, &c->data);
  bind_dist_config(b, &c->dist);
}

void RunConfig::validate() const {
  moe.validate();
  train.validate();
  data.validate();
  dist.validate();
  // A router setting that pools each row's prompt needs rows of one instruction sample each.
  if (const auto [key, what] = moe.prompt_rows();
      !key.empty() && (data.corpus != "instruct" || data.instruct_pack))
    throw ConfigError(key, what +
                               ": it needs data.corpus = \"instruct\" and data.instruct_pack = false (one "
                               "sample per sequence)");
  if (dist.expert_parallel > 1 && moe.routed_experts() % dist.expert_parallel != 0)
    throw ConfigError("dist.expert_parallel", std::to_string(moe.routed_experts()) +
                                                  " routed experts do not split evenly over " +
                                                  std::to_string(dist.expert_parallel) + " ranks");
  if (dist.expert_parallel > 1 && moe.expert_form != ExpertForm::kFFN)
    throw ConfigError("dist.expert_parallel", "shards FFN experts only (moe.expert_form = \"ffn\")");
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
