#include "moeforge/routing/moe_config.h"

#include <cmath>

#include "moeforge/config/binder.h"
#include "moeforge/routing/registry.h"
#include "moeforge/util/error.h"

namespace moeforge {

void MoEConfig::validate() const {
  router_spec(router);  // ConfigError naming moe.router and the known names when unknown
  if (n_expert < 1) throw ConfigError("moe.n_expert", "must be >= 1, got " + std::to_string(n_expert));
  if (n_expert_used < 1)
    throw ConfigError("moe.n_expert_used", "must be >= 1, got " + std::to_string(n_expert_used));
  if (n_expert_used > n_expert)
    throw ConfigError("moe.n_expert_used", "K = " + std::to_string(n_expert_used) +
                                               " must not exceed moe.n_expert = " + std::to_string(n_expert));
  if (n_shared_expert < 0)
    throw ConfigError("moe.n_shared_expert", "must be >= 0, got " + std::to_string(n_shared_expert));
  if (shared_gate && n_shared_expert == 0)
    throw ConfigError("moe.shared_gate", "gates the shared experts, but moe.n_shared_expert is 0");
  if (d_expert < 1) throw ConfigError("moe.d_expert", "must be >= 1, got " + std::to_string(d_expert));
  if (expert_split < 1)
    throw ConfigError("moe.expert_split", "must be >= 1, got " + std::to_string(expert_split));
  if (d_expert % expert_split != 0)
    throw ConfigError("moe.expert_split", "moe.d_expert = " + std::to_string(d_expert) +
                                              " is not divisible by the split factor " +
                                              std::to_string(expert_split));
  if (!std::isfinite(capacity_factor) || capacity_factor < 0)
    throw ConfigError("moe.capacity_factor",
                      "must be >= 0 (0 = dropless), got " + std::to_string(capacity_factor));
  auto nonneg = [](const char* name, double v) {
    if (!std::isfinite(v) || v < 0)
      throw ConfigError(name, "must be a finite number >= 0, got " + std::to_string(v));
  };
  nonneg("moe.balance_coef", balance_coef);
  nonneg("moe.seq_balance_coef", seq_balance_coef);
  nonneg("moe.z_loss_coef", z_loss_coef);
  if (gshard_random_second && n_expert_used < 2)
    throw ConfigError("moe.gshard_random_second", "needs moe.n_expert_used >= 2");
  validate_router_keys(*this);  // the picked router's own keys, through its registry row
  if (expert_form == ExpertForm::kAdapter) {
    if (adapter_dim < 1)
      throw ConfigError("moe.adapter_dim", "must be >= 1, got " + std::to_string(adapter_dim));
    if (!std::isfinite(adapter_scale))
      throw ConfigError("moe.adapter_scale", "must be finite, got " + std::to_string(adapter_scale));
  }
}

std::pair<std::string, std::string> MoEConfig::prompt_rows() const {
  const auto& spec = router_spec(router);
  return spec.prompt_rows ? spec.prompt_rows(*this) : std::pair<std::string, std::string>();
}

void bind_moe_config(ConfigBinder& b, MoEConfig* c) {
  b.bind("moe.router", &c->router);
  b.bind("moe.n_expert", &c->n_expert);
  b.bind("moe.n_expert_used", &c->n_expert_used);
  b.bind("moe.n_shared_expert", &c->n_shared_expert);
  b.bind("moe.shared_gate", &c->shared_gate);
  b.bind("moe.d_expert", &c->d_expert);
  b.bind("moe.expert_split", &c->expert_split);
  b.bind_enum("moe.expert_act", &c->expert_act, {{"swiglu", ExpertAct::kSwiGLU}, {"gelu", ExpertAct::kGELU}});
  b.bind_enum("moe.experts_impl", &c->experts_impl,
              {{"grouped", ExpertsImplKind::kGrouped}, {"reference", ExpertsImplKind::kReference}});
  b.bind_enum("moe.score", &c->score, {{"softmax", ScoreFunc::kSoftmax}, {"sigmoid", ScoreFunc::kSigmoid}});
  b.bind("moe.renormalize", &c->renormalize);
  b.bind("moe.noisy", &c->noisy);
  b.bind("moe.gshard_random_second", &c->gshard_random_second);
  b.bind("moe.capacity_factor", &c->capacity_factor);
  b.bind_enum(
      "moe.overflow", &c->overflow,
      {{"token_order", OverflowOrder::kTokenOrder}, {"batch_prioritized", OverflowOrder::kBatchPrioritized}});
  b.bind("moe.balance_coef", &c->balance_coef);
  b.bind("moe.seq_balance_coef", &c->seq_balance_coef);
  b.bind("moe.z_loss_coef", &c->z_loss_coef);
  // Shared by the two-stage routers (hierarchical, moce): G.
  b.bind("moe.n_cluster", &c->n_cluster);
  b.bind_enum("moe.expert_form", &c->expert_form,
              {{"ffn", ExpertForm::kFFN}, {"adapter", ExpertForm::kAdapter}});
  b.bind("moe.adapter_dim", &c->adapter_dim);
  b.bind("moe.adapter_scale", &c->adapter_scale);
  // Every router's own keys, from its registry row.
  for (const auto& r : router_registry())
    if (r.bind) r.bind(b, c);
}

std::string to_string(ScoreFunc v) {
  return v == ScoreFunc::kSoftmax ? "softmax" : "sigmoid";
}
std::string to_string(OverflowOrder v) {
  return v == OverflowOrder::kTokenOrder ? "token_order" : "batch_prioritized";
}
std::string to_string(ExpertAct v) {
  return v == ExpertAct::kSwiGLU ? "swiglu" : "gelu";
}
std::string to_string(ExpertsImplKind v) {
  return v == ExpertsImplKind::kGrouped ? "grouped" : "reference";
}
std::string to_string(ExpertForm v) {
  return v == ExpertForm::kFFN ? "ffn" : "adapter";
}

}  // namespace moeforge
