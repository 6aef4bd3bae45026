// The [moe] section of a moeforge config: which router, how many experts, capacity, aux losses.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moeforge {

enum class ScoreFunc { kSoftmax, kSigmoid };
enum class OverflowOrder { kTokenOrder, kBatchPrioritized };
enum class ExpertAct { kSwiGLU, kGELU };
enum class ExpertsImplKind { kGrouped, kReference };
enum class ExpertForm { kFFN, kAdapter };

// --- Expert choice, loss-free and BIP routers (docs/routing.md sections 2-4) ---
enum class ECMode { kCausal, kNonCausal, kThreshold };
enum class ECEval { kBatch, kThreshold };
enum class BipMode { kCausal, kSolve };
// MoCE's stage-1 sequence clusters (docs/routing.md section 6).
enum class SeqClustering { kOnline, kHidden, kTfidf };
// What MoCE pools to assign a token its cluster: the positions up to it (causal) or the whole sequence.
enum class MocePool { kPrefix, kSequence, kPrompt };

struct MoEConfig {
  std::string router = "topk";  // moe.router
  int64_t n_expert = 8;         // moe.n_expert: routed experts E (before fine-grained splitting)
  int64_t n_expert_used = 2;    // moe.n_expert_used: K
  int64_t n_shared_expert = 0;  // moe.n_shared_expert: K_s experts that see every token
  // moe.shared_gate: the shared experts' output times sigmoid(w . x), a learned [C] gate per layer
  // (Qwen2-MoE; docs/interop.md). Off: shared experts are added ungated (DeepSeekMoE).
  bool shared_gate = false;
  int64_t d_expert = 256;                     // moe.d_expert: hidden width F of one expert (before splitting)
  int64_t expert_split = 1;                   // moe.expert_split: DeepSeekMoE fine-grained factor m
  ExpertAct expert_act = ExpertAct::kSwiGLU;  // moe.expert_act: "swiglu" | "gelu"
  ExpertsImplKind experts_impl = ExpertsImplKind::kGrouped;  // moe.experts_impl: "grouped" | "reference"
  // dist.expert_parallel: how many ranks share the routed experts of every MoE layer, each holding
  // n_expert * expert_split / N of them (docs/distributed.md); N divides the world size. In one process
  // (eval, generate, a resume on one rank) every expert is local whatever it says.
  int64_t expert_parallel = 1;

  // Token-choice options (docs/routing.md section 1).
  ScoreFunc score = ScoreFunc::kSoftmax;                // moe.score: "softmax" | "sigmoid"
  bool renormalize = true;                              // moe.renormalize (always on for sigmoid)
  bool noisy = false;                                   // moe.noisy: Shazeer noisy top-K (training only)
  bool gshard_random_second = false;                    // moe.gshard_random_second
  double capacity_factor = 0.0;                         // moe.capacity_factor: 0 = dropless
  OverflowOrder overflow = OverflowOrder::kTokenOrder;  // moe.overflow: "token_order" | "batch_prioritized"

  // Auxiliary losses (docs/routing.md section 8).
  double balance_coef = 1e-2;     // moe.balance_coef: Switch balance loss alpha
  double seq_balance_coef = 0.0;  // moe.seq_balance_coef: sequence-wise balance loss alpha
  double z_loss_coef = 1e-3;      // moe.z_loss_coef: router z-loss beta

  // --- Hierarchical cluster routing (router "hierarchical", docs/routing.md section 5) and MoCE (router
  // "moce", section 6). For "hierarchical", moe.n_expert_used is K_e, the experts taken inside each selected
  // cluster, so a token has up to n_cluster_used * n_expert_used assignments. For "moce" it is K inside the
  // group.
  int64_t n_cluster = 2;                 // moe.n_cluster: G (expert clusters / sequence clusters)
  int64_t n_cluster_used = 1;            // moe.n_cluster_used: K_c clusters per token (hierarchical)
  double cluster_capacity_factor = 0.0;  // moe.cluster_capacity_factor: cap_c = ceil(CF*T*K_c/G), 0 = none
  double reliability_decay = 0.9;        // moe.reliability_decay: EMA decay of expert/cluster reliability
  double reliability_explode = 10.0;     // moe.reliability_explode: output RMS > this x median = unhealthy
  // moe.reliability_recovery: per idle step, an expert (or cluster) with no health signal moves r toward
  // the prior 1 as r <- rec * r + (1 - rec); slower than the penalty, so a faulty expert is probed rarely.
  double reliability_recovery = 0.999;
  double diversity_coef = 1e-2;   // moe.diversity_coef: within-cluster router-row cosine penalty
  bool adaptive_weight = false;   // moe.adaptive_weight: scale the MoE output by sigmoid(w.x)
  int64_t moce_n_general = 0;     // moe.moce_n_general: general experts (last ones of n_expert)
  int64_t moce_general_used = 1;  // moe.moce_general_used: general experts per token
  double centroid_decay = 0.99;   // moe.centroid_decay: EMA decay of MoCE's online centroids
  // moe.moce_pool: "prefix" (causal, the default: a token's cluster is that of the running mean of the
  // positions up to it), "sequence" (NON-CAUSAL: the whole sequence's mean, labelled so in reports) or
  // "prompt" (instruction data, MoCE's own setting: the running mean up to the end of the prompt, then the
  // prompt's mean for every later position, so the cluster depends on the instruction and input only;
  // needs data.corpus = "instruct" with data.instruct_pack = false, docs/routing.md section 6).
  MocePool moce_pool = MocePool::kPrefix;
  double moce_balance_rate = 1e-3;  // moe.moce_balance_rate: step of the cluster balance bias (0 = off)
  // moe.moce_clustering: how training sequences get their cluster. "online" (the default: works from
  // scratch) assigns each batch to the nearest EMA centroid; "hidden" clusters, before training, the
  // mean-pooled first-MoE-layer input of every training sequence under the --init checkpoint's weights
  // with spherical k-means, and makes the k-means centroids the router's (so generation's nearest-centroid
  // assignment lives in the same space); "tfidf" clusters TF-IDF bags of words and gives the router the
  // mean hidden representation of each cluster. Offline clustering sets the router's centroids; the
  // router then assigns every sequence itself, by the same rule in training, evaluation and generation.
  SeqClustering moce_clustering = SeqClustering::kOnline;
  // Expert form (any router): full FFN experts, or MoCE/PESC adapters on a frozen dense FFN of width
  // d_expert.
  ExpertForm expert_form = ExpertForm::kFFN;  // moe.expert_form: "ffn" | "adapter"
  int64_t adapter_dim = 64;                   // moe.adapter_dim: adapter bottleneck width
  double adapter_scale = 1.0;  // moe.adapter_scale: lambda in A(z) = lambda W_up gelu(W_down z)
  // --- Expert choice, loss-free and BIP routers (docs/routing.md sections 2-4) ---
  // Expert choice (Zhou et al. 2022): expert e takes k_e = round(T * ec_capacity_factor / E) tokens.
  double ec_capacity_factor = 2.0;  // moe.ec_capacity_factor: the paper's CF (2 = compute of top-2)
  // How EC routes in training: "causal" (choice among the tokens at the same position across the batch,
  // the LM default), "noncausal" (choice over the whole batch: leaks the future, encoders/analysis only),
  // "threshold" (per-token routing with the calibrated thresholds, training and evaluation alike).
  ECMode ec_mode = ECMode::kCausal;
  // Routing in evaluation for ec_mode causal/noncausal: "threshold" (what generation can use) or "batch"
  // (the training grouping; evaluation reports both, docs/routing.md section 2).
  ECEval ec_eval = ECEval::kThreshold;
  double ec_threshold_decay = 0.99;  // moe.ec_threshold_decay: EMA decay of the thresholds
  // Loss-free balancing (Wang et al. 2024): bias step u.
  double bias_update_rate = 1e-3;  // moe.bias_update_rate
  // BIP balancing (Sun 2025): dual iterations per step and causal/solve-then-route (non-causal) mode.
  int64_t bip_iters = 2;                // moe.bip_iters
  BipMode bip_mode = BipMode::kCausal;  // moe.bip_mode: "causal" | "solve"

  // Options of routers that have no field above: a router's registry row binds its own numeric keys
  // ("moe.<key>") into this map (`bind_router_option`), so that a new router with new options touches no
  // file outside its own two and the registry (docs/routing.md, "Adding a router").
  std::map<std::string, double> router_options;
  // The value of moe.<key> from router_options; ConfigError naming "moe.<key>" when no row bound it.
  double router_option(const std::string& key) const;

  // Shapes after DeepSeekMoE fine-grained splitting: m*E experts of width F/m, m*K active.
  int64_t routed_experts() const { return n_expert * expert_split; }
  int64_t routed_used() const { return n_expert_used * expert_split; }
  int64_t routed_width() const { return d_expert / expert_split; }

  // Throws ConfigError naming the field when a value is out of range: the common keys here, the picked
  // router's own keys through its registry row (routing/registry.h).
  void validate() const;
  // The picked router's keys and the expert form (called by validate()).
  void validate_cluster_routing() const;
};

class ConfigBinder;
// Registers every [moe] key of `cfg` under "moe.<key>": the common ones and each registered router's.
void bind_moe_config(ConfigBinder& binder, MoEConfig* cfg);
// For a router's registry row: binds "moe.<key>" to cfg->router_options[key], starting at `default_value`
// when the config does not hold it yet.
void bind_router_option(ConfigBinder& binder, MoEConfig* cfg, const std::string& key, double default_value);

std::string to_string(ScoreFunc v);
std::string to_string(OverflowOrder v);
std::string to_string(ExpertAct v);
std::string to_string(ExpertsImplKind v);
std::string to_string(ExpertForm v);
std::string to_string(ECMode v);
std::string to_string(ECEval v);
std::string to_string(BipMode v);
std::string to_string(SeqClustering v);
std::string to_string(MocePool v);

}  // namespace moeforge
