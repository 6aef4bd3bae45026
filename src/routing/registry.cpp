// The router registry (registry.h): one row per router. Adding a router is its own .h/.cpp and one row
// here (docs/routing.md, "Adding a router").
#include "moeforge/routing/registry.h"

#include <cmath>
#include <string>

#include "moeforge/config/binder.h"
#include "moeforge/config/moe_config.h"
#include "moeforge/routing/bip.h"
#include "moeforge/routing/expert_choice.h"
#include "moeforge/routing/hierarchical.h"
#include "moeforge/routing/loss_free.h"
#include "moeforge/routing/moce.h"
#include "moeforge/routing/topk.h"
#include "moeforge/util/error.h"

namespace moeforge {

namespace {

std::string str(int64_t v) {
  return std::to_string(v);
}

template <class Impl>
std::function<std::shared_ptr<Router>(const MoEConfig&, int64_t)> factory() {
  return [](const MoEConfig& cfg, int64_t d_model) { return std::make_shared<Impl>(cfg, d_model); };
}

// Token-choice routers keep K per token as it is.
std::string same_k(MoEConfig& m) {
  return "top-" + str(m.n_expert_used);
}

void check_unit_decay(const char* key, double v) {
  if (!(v >= 0 && v < 1)) throw ConfigError(key, "must be in [0, 1), got " + std::to_string(v));
}

void check_nonneg(const char* key, double v) {
  if (!std::isfinite(v) || v < 0)
    throw ConfigError(key, "must be a finite number >= 0, got " + std::to_string(v));
}

// The G-cluster keys shared by hierarchical and MoCE (moe.n_cluster is bound with the common keys).
void check_clusters(const MoEConfig& c) {
  if (c.n_cluster < 1) throw ConfigError("moe.n_cluster", "must be >= 1, got " + str(c.n_cluster));
}

RouterSpec topk_row() {
  RouterSpec r;
  r.name = "topk";
  r.summary =
      "token-choice top-K: Switch (K=1), GShard (K=2), Mixtral, noisy, sigmoid (docs/routing.md section 1)";
  r.make = factory<TopKRouterImpl>();
  r.equal_compute = same_k;
  return r;
}

RouterSpec expert_choice_row() {
  RouterSpec r;
  r.name = "expert_choice";
  r.summary =
      "expert choice: each expert takes its best tokens (Zhou et al. 2022; docs/routing.md section 2)";
  r.make = factory<ExpertChoiceRouterImpl>();
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    b.bind("moe.ec_capacity_factor", &c->ec_capacity_factor);
    b.bind_enum(
        "moe.ec_mode", &c->ec_mode,
        {{"causal", ECMode::kCausal}, {"noncausal", ECMode::kNonCausal}, {"threshold", ECMode::kThreshold}});
    b.bind_enum("moe.ec_eval", &c->ec_eval, {{"batch", ECEval::kBatch}, {"threshold", ECEval::kThreshold}});
    b.bind("moe.ec_threshold_decay", &c->ec_threshold_decay);
  };
  r.validate = [](const MoEConfig& c) {
    // CF <= E keeps k_e <= T: an expert cannot take more tokens than the batch (or a position group) has.
    if (!std::isfinite(c.ec_capacity_factor) || c.ec_capacity_factor <= 0 ||
        c.ec_capacity_factor > double(c.n_expert))
      throw ConfigError("moe.ec_capacity_factor",
                        "must be in (0, moe.n_expert], got " + std::to_string(c.ec_capacity_factor));
    if (c.score != ScoreFunc::kSoftmax)
      throw ConfigError("moe.score", "expert_choice scores are a softmax over experts (Zhou et al. 2022)");
    check_unit_decay("moe.ec_threshold_decay", c.ec_threshold_decay);
  };
  r.equal_compute = [](MoEConfig& m) {
    // k_e = round(T * CF / E) tokens per expert, so T * CF assignments in all: CF = K per token (Zhou et
    // al. 2022 section 3: "capacity factor 2 matches the compute of top-2").
    m.ec_capacity_factor = double(m.routed_used());
    return "capacity factor " + str(m.routed_used());
  };
  return r;
}

RouterSpec loss_free_row() {
  RouterSpec r;
  r.name = "loss_free";
  r.summary = "loss-free balancing: top-K of s + b, b stepped against the load (Wang et al. 2024; section 3)";
  r.make = factory<LossFreeRouterImpl>();
  r.bind = [](ConfigBinder& b, MoEConfig* c) { b.bind("moe.bias_update_rate", &c->bias_update_rate); };
  r.validate = [](const MoEConfig& c) { check_nonneg("moe.bias_update_rate", c.bias_update_rate); };
  r.equal_compute = same_k;
  return r;
}

RouterSpec bip_row() {
  RouterSpec r;
  r.name = "bip";
  r.summary = "BIP balancing: top-K of s - q, q the LP dual of the balanced assignment (Sun 2025; section 4)";
  r.make = factory<BipRouterImpl>();
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    b.bind("moe.bip_iters", &c->bip_iters);
    b.bind_enum("moe.bip_mode", &c->bip_mode, {{"causal", BipMode::kCausal}, {"solve", BipMode::kSolve}});
  };
  r.validate = [](const MoEConfig& c) {
    if (c.bip_iters < 1) throw ConfigError("moe.bip_iters", "must be >= 1, got " + str(c.bip_iters));
  };
  r.equal_compute = same_k;
  return r;
}

RouterSpec hierarchical_row() {
  RouterSpec r;
  r.name = "hierarchical";
  r.summary = "cluster-then-expert routing with reliability tracking (ClusterMoE; section 5)";
  r.make = factory<HierarchicalRouterImpl>();
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    b.bind("moe.n_cluster_used", &c->n_cluster_used);
    b.bind("moe.cluster_capacity_factor", &c->cluster_capacity_factor);
    b.bind("moe.reliability_decay", &c->reliability_decay);
    b.bind("moe.reliability_explode", &c->reliability_explode);
    b.bind("moe.reliability_recovery", &c->reliability_recovery);
    // moe.reliability: 1 (default) tracks expert and cluster reliability; 0 switches it off (r stays 1), the
    // baseline of the fault experiment (docs/comparison.md).
    bind_router_option(b, c, "reliability", 1.0);
    b.bind("moe.diversity_coef", &c->diversity_coef);
    b.bind("moe.adaptive_weight", &c->adaptive_weight);
  };
  r.validate = [](const MoEConfig& c) {
    check_clusters(c);
    const int64_t E = c.routed_experts(), K = c.routed_used(), G = c.n_cluster;
    if (E % G != 0)
      throw ConfigError("moe.n_cluster",
                        "the " + str(E) + " routed experts do not split into " + str(G) + " equal clusters");
    if (c.n_cluster_used < 1 || c.n_cluster_used > G)
      throw ConfigError("moe.n_cluster_used",
                        "must be in [1, moe.n_cluster = " + str(G) + "], got " + str(c.n_cluster_used));
    if (K > E / G)
      throw ConfigError("moe.n_expert_used",
                        "K_e = " + str(K) + " exceeds the " + str(E / G) + " experts of one cluster");
    if (!std::isfinite(c.cluster_capacity_factor) || c.cluster_capacity_factor < 0)
      throw ConfigError("moe.cluster_capacity_factor",
                        "must be >= 0 (0 = none), got " + std::to_string(c.cluster_capacity_factor));
    check_unit_decay("moe.reliability_decay", c.reliability_decay);
    check_unit_decay("moe.reliability_recovery", c.reliability_recovery);
    // A MoEConfig built in code (not through the binder) has no entry: the default, 1.
    const auto rel = c.router_options.find("reliability");
    if (const double on = rel == c.router_options.end() ? 1.0 : rel->second; on != 0 && on != 1)
      throw ConfigError("moe.reliability",
                        "must be 1 (track reliability) or 0 (off), got " + std::to_string(on));
    if (!(c.reliability_explode > 1) || !std::isfinite(c.reliability_explode))
      throw ConfigError("moe.reliability_explode",
                        "must be a finite number > 1, got " + std::to_string(c.reliability_explode));
    check_nonneg("moe.diversity_coef", c.diversity_coef);
  };
  r.equal_compute = [](MoEConfig& m) {
    // K_c clusters x K_e experts in each: the fewest clusters that fit, so the choice inside a cluster stays
    // as wide as possible.
    const int64_t K = m.n_expert_used, G = m.n_cluster, Eg = m.routed_experts() / std::max<int64_t>(G, 1);
    int64_t kc = 0;
    for (int64_t c = 1; c <= std::min(K, G) && kc == 0; ++c)
      if (K % c == 0 && K / c <= Eg) kc = c;
    if (kc == 0)
      throw ConfigError("moe.n_expert_used", "K = " + str(K) + " cannot be split as K_c * K_e with K_c <= " +
                                                 str(G) + " clusters and K_e <= " + str(Eg) +
                                                 " experts per cluster (hierarchical at equal compute)");
    m.n_cluster_used = kc;
    m.n_expert_used = K / kc;
    return "K_c " + str(kc) + " x K_e " + str(K / kc);
  };
  return r;
}

RouterSpec moce_row() {
  RouterSpec r;
  r.name = "moce";
  r.summary =
      "MoCE dual-stage routing: sequence clusters, then top-K in the cluster's group (Eo et al. 2025; "
      "section 6)";
  r.make = factory<MoCERouterImpl>();
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    b.bind("moe.moce_n_general", &c->moce_n_general);
    b.bind("moe.moce_general_used", &c->moce_general_used);
    b.bind("moe.centroid_decay", &c->centroid_decay);
    b.bind_enum(
        "moe.moce_pool", &c->moce_pool,
        {{"prefix", MocePool::kPrefix}, {"sequence", MocePool::kSequence}, {"prompt", MocePool::kPrompt}});
    b.bind("moe.moce_balance_rate", &c->moce_balance_rate);
    b.bind_enum("moe.moce_clustering", &c->moce_clustering,
                {{"online", SeqClustering::kOnline},
                 {"hidden", SeqClustering::kHidden},
                 {"tfidf", SeqClustering::kTfidf}});
  };
  r.validate = [](const MoEConfig& c) {
    check_clusters(c);
    const int64_t E = c.routed_experts(), K = c.routed_used();
    if (c.moce_n_general < 0 || c.moce_n_general >= E)
      throw ConfigError("moe.moce_n_general", "must be in [0, " + str(E) + "), got " + str(c.moce_n_general));
    const int64_t grouped = E - c.moce_n_general;
    if (grouped % c.n_cluster != 0)
      throw ConfigError("moe.n_cluster", "the " + str(grouped) + " cluster experts do not split into " +
                                             str(c.n_cluster) + " equal groups");
    if (K > grouped / c.n_cluster)
      throw ConfigError("moe.n_expert_used", "K = " + str(K) + " exceeds the " + str(grouped / c.n_cluster) +
                                                 " experts of one cluster group");
    if (c.moce_n_general > 0 && (c.moce_general_used < 1 || c.moce_general_used > c.moce_n_general))
      throw ConfigError("moe.moce_general_used",
                        "must be in [1, moe.moce_n_general = " + str(c.moce_n_general) + "], got " +
                            str(c.moce_general_used));
    check_unit_decay("moe.centroid_decay", c.centroid_decay);
    check_nonneg("moe.moce_balance_rate", c.moce_balance_rate);
  };
  r.equal_compute = [](MoEConfig& m) {
    // General experts add moce_general_used assignments to every token: take them out of the group's K.
    const int64_t K = m.n_expert_used, general = m.moce_n_general > 0 ? m.moce_general_used : 0;
    if (K - general < 1)
      throw ConfigError("moe.moce_general_used",
                        "leaves no group expert within K = " + str(K) + " (moce at equal compute)");
    m.n_expert_used = K - general;
    return "top-" + str(K - general) + " in group" +
           (general ? " + " + str(general) + " general" : std::string());
  };
  return r;
}

}  // namespace

const std::vector<RouterSpec>& router_registry() {
  static const std::vector<RouterSpec> kRows = {topk_row(), expert_choice_row(), loss_free_row(),
                                                bip_row(),  hierarchical_row(),  moce_row()};
  return kRows;
}

void validate_router_keys(const MoEConfig& cfg) {
  const auto& spec = router_spec(cfg.router);
  if (spec.validate) spec.validate(cfg);
  // Offline sequence clustering only means something to a router that routes by sequence cluster.
  if (cfg.moce_clustering != SeqClustering::kOnline && cfg.router != "moce")
    throw ConfigError("moe.moce_clustering",
                      "\"" + to_string(cfg.moce_clustering) +
                          "\" needs moe.router = \"moce\" (only MoCE routes by sequence "
                          "cluster), got \"" +
                          cfg.router + "\"");
}

std::vector<std::string> router_names() {
  std::vector<std::string> out;
  for (const auto& r : router_registry()) out.push_back(r.name);
  return out;
}

const RouterSpec& router_spec(const std::string& name) {
  std::string all;
  for (const auto& r : router_registry()) {
    if (r.name == name) return r;
    all += (all.empty() ? "" : ", ") + r.name;
  }
  throw ConfigError("moe.router", "unknown router '" + name + "' (expected one of: " + all + ")");
}

}  // namespace moeforge
