#include "moeforge/config/moe_config.h"

#include <cmath>

#include "moeforge/config/binder.h"
#include "moeforge/util/error.h"

namespace moeforge {

const std::vector<std::string>& available_routers() {
  static const std::vector<std::string> kRouters = {"topk", "expert_choice", "loss_free",
                                                    "bip",  "hierarchical",  "moce"};
  return kRouters;
}

void MoEConfig::validate() const {
  bool known = false;
  std::string all;
  for (const auto& r : available_routers()) {
    known = known || router == r;
    all += (all.empty() ? "" : ", ") + r;
  }
  if (!known)
    throw ConfigError("moe.router", "unknown router '" + router + "' (expected one of: " + all + ")");
  if (n_expert < 1) throw ConfigError("moe.n_expert", "must be >= 1, got " + std::to_string(n_expert));
  if (n_expert_used < 1)
    throw ConfigError("moe.n_expert_used", "must be >= 1, got " + std::to_string(n_expert_used));
  if (n_expert_used > n_expert)
    throw ConfigError("moe.n_expert_used", "K = " + std::to_string(n_expert_used) +
                                               " must not exceed moe.n_expert = " + std::to_string(n_expert));
  if (n_shared_expert < 0)
    throw ConfigError("moe.n_shared_expert", "must be >= 0, got " + std::to_string(n_shared_expert));
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

  // --- Expert choice, loss-free and BIP routers (ROUTING.md sections 2-4) ---
  // CF <= E keeps k_e <= T: an expert cannot take more tokens than the batch (or a position group) has.
  if (!std::isfinite(ec_capacity_factor) || ec_capacity_factor <= 0 || ec_capacity_factor > double(n_expert))
    throw ConfigError("moe.ec_capacity_factor",
                      "must be in (0, moe.n_expert], got " + std::to_string(ec_capacity_factor));
  if (router == "expert_choice" && score != ScoreFunc::kSoftmax)
    throw ConfigError("moe.score", "expert_choice scores are a softmax over experts (Zhou et al. 2022)");
  if (!(ec_threshold_decay >= 0 && ec_threshold_decay < 1))
    throw ConfigError("moe.ec_threshold_decay",
                      "must be in [0, 1), got " + std::to_string(ec_threshold_decay));
  nonneg("moe.bias_update_rate", bias_update_rate);
  if (bip_iters < 1) throw ConfigError("moe.bip_iters", "must be >= 1, got " + std::to_string(bip_iters));
  validate_cluster_routing();
}

// The hierarchical / MoCE block and the expert form (ROUTING.md sections 5 and 6).
void MoEConfig::validate_cluster_routing() const {
  auto str = [](auto v) { return std::to_string(v); };
  const int64_t E = routed_experts(), K = routed_used();
  if (router == "hierarchical" || router == "moce") {
    if (n_cluster < 1) throw ConfigError("moe.n_cluster", "must be >= 1, got " + str(n_cluster));
  }
  if (router == "hierarchical") {
    if (E % n_cluster != 0)
      throw ConfigError("moe.n_cluster", "the " + str(E) + " routed experts do not split into " +
                                             str(n_cluster) + " equal clusters");
    if (n_cluster_used < 1 || n_cluster_used > n_cluster)
      throw ConfigError("moe.n_cluster_used",
                        "must be in [1, moe.n_cluster = " + str(n_cluster) + "], got " + str(n_cluster_used));
    if (K > E / n_cluster)
      throw ConfigError("moe.n_expert_used",
                        "K_e = " + str(K) + " exceeds the " + str(E / n_cluster) + " experts of one cluster");
    if (!std::isfinite(cluster_capacity_factor) || cluster_capacity_factor < 0)
      throw ConfigError("moe.cluster_capacity_factor",
                        "must be >= 0 (0 = none), got " + std::to_string(cluster_capacity_factor));
    if (!(reliability_decay >= 0 && reliability_decay < 1))
      throw ConfigError("moe.reliability_decay",
                        "must be in [0, 1), got " + std::to_string(reliability_decay));
    if (!(reliability_explode > 1) || !std::isfinite(reliability_explode))
      throw ConfigError("moe.reliability_explode",
                        "must be a finite number > 1, got " + std::to_string(reliability_explode));
    if (!std::isfinite(diversity_coef) || diversity_coef < 0)
      throw ConfigError("moe.diversity_coef",
                        "must be a finite number >= 0, got " + std::to_string(diversity_coef));
  }
  if (router == "moce") {
    if (moce_n_general < 0 || moce_n_general >= E)
      throw ConfigError("moe.moce_n_general", "must be in [0, " + str(E) + "), got " + str(moce_n_general));
    const int64_t grouped = E - moce_n_general;
    if (grouped % n_cluster != 0)
      throw ConfigError("moe.n_cluster", "the " + str(grouped) + " cluster experts do not split into " +
                                             str(n_cluster) + " equal groups");
    if (K > grouped / n_cluster)
      throw ConfigError("moe.n_expert_used", "K = " + str(K) + " exceeds the " + str(grouped / n_cluster) +
                                                 " experts of one cluster group");
    if (moce_n_general > 0 && (moce_general_used < 1 || moce_general_used > moce_n_general))
      throw ConfigError(
          "moe.moce_general_used",
          "must be in [1, moe.moce_n_general = " + str(moce_n_general) + "], got " + str(moce_general_used));
    if (!(centroid_decay >= 0 && centroid_decay < 1))
      throw ConfigError("moe.centroid_decay", "must be in [0, 1), got " + std::to_string(centroid_decay));
  }
  if (moce_clustering != SeqClustering::kOnline && router != "moce")
    throw ConfigError("moe.moce_clustering",
                      "\"" + to_string(moce_clustering) +
                          "\" needs moe.router = \"moce\" (only MoCE routes by sequence "
                          "cluster), got \"" +
                          router + "\"");
  if (expert_form == ExpertForm::kAdapter) {
    if (adapter_dim < 1) throw ConfigError("moe.adapter_dim", "must be >= 1, got " + str(adapter_dim));
    if (!std::isfinite(adapter_scale))
      throw ConfigError("moe.adapter_scale", "must be finite, got " + std::to_string(adapter_scale));
  }
}

void bind_moe_config(ConfigBinder& b, MoEConfig* c) {
  b.bind("moe.router", &c->router);
  b.bind("moe.n_expert", &c->n_expert);
  b.bind("moe.n_expert_used", &c->n_expert_used);
  b.bind("moe.n_shared_expert", &c->n_shared_expert);
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
  // Hierarchical / MoCE block and expert form.
  b.bind("moe.n_cluster", &c->n_cluster);
  b.bind("moe.n_cluster_used", &c->n_cluster_used);
  b.bind("moe.cluster_capacity_factor", &c->cluster_capacity_factor);
  b.bind("moe.reliability_decay", &c->reliability_decay);
  b.bind("moe.reliability_explode", &c->reliability_explode);
  b.bind("moe.diversity_coef", &c->diversity_coef);
  b.bind("moe.adaptive_weight", &c->adaptive_weight);
  b.bind("moe.moce_n_general", &c->moce_n_general);
  b.bind("moe.moce_general_used", &c->moce_general_used);
  b.bind("moe.centroid_decay", &c->centroid_decay);
  b.bind_enum("moe.moce_clustering", &c->moce_clustering,
              {{"online", SeqClustering::kOnline},
               {"hidden", SeqClustering::kHidden},
               {"tfidf", SeqClustering::kTfidf}});
  b.bind_enum("moe.expert_form", &c->expert_form,
              {{"ffn", ExpertForm::kFFN}, {"adapter", ExpertForm::kAdapter}});
  b.bind("moe.adapter_dim", &c->adapter_dim);
  b.bind("moe.adapter_scale", &c->adapter_scale);

  // --- Expert choice, loss-free and BIP routers (ROUTING.md sections 2-4) ---
  b.bind("moe.ec_capacity_factor", &c->ec_capacity_factor);
  b.bind_enum(
      "moe.ec_mode", &c->ec_mode,
      {{"causal", ECMode::kCausal}, {"noncausal", ECMode::kNonCausal}, {"threshold", ECMode::kThreshold}});
  b.bind_enum("moe.ec_eval", &c->ec_eval, {{"batch", ECEval::kBatch}, {"threshold", ECEval::kThreshold}});
  b.bind("moe.ec_threshold_decay", &c->ec_threshold_decay);
  b.bind("moe.bias_update_rate", &c->bias_update_rate);
  b.bind("moe.bip_iters", &c->bip_iters);
  b.bind_enum("moe.bip_mode", &c->bip_mode, {{"causal", BipMode::kCausal}, {"solve", BipMode::kSolve}});
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

std::string to_string(ECMode v) {
  return v == ECMode::kCausal ? "causal" : v == ECMode::kNonCausal ? "noncausal" : "threshold";
}
std::string to_string(ECEval v) {
  return v == ECEval::kBatch ? "batch" : "threshold";
}
std::string to_string(SeqClustering v) {
  return v == SeqClustering::kOnline ? "online" : v == SeqClustering::kHidden ? "hidden" : "tfidf";
}
std::string to_string(BipMode v) {
  return v == BipMode::kCausal ? "causal" : "solve";
}

}  // namespace moeforge
