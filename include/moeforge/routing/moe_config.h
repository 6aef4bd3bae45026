// The [moe] section of a moeforge config: which router, how many experts, capacity, aux losses, and each
// router's own options (their own headers, bound and checked by the router's registry row). Owned by
// routing/; a section header (docs/architecture.md, "Config sections": it includes nothing of moeforge but
// other section headers).
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "moeforge/routing/bip_options.h"
#include "moeforge/routing/expert_choice_options.h"
#include "moeforge/routing/hierarchical_options.h"
#include "moeforge/routing/loss_free_options.h"
#include "moeforge/routing/moce_options.h"

namespace moeforge {

enum class ScoreFunc { kSoftmax, kSigmoid };
enum class OverflowOrder { kTokenOrder, kBatchPrioritized };
enum class ExpertAct { kSwiGLU, kGELU };
enum class ExpertsImplKind { kGrouped, kReference };
enum class ExpertForm { kFFN, kAdapter };

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

  // moe.n_cluster: G, the expert clusters of the two-stage routers (hierarchical: clusters of experts;
  // moce: the sequence clusters, each with its group of experts).
  int64_t n_cluster = 2;
  // Expert form (any router): full FFN experts, or MoCE/PESC adapters on a frozen dense FFN of width
  // d_expert.
  ExpertForm expert_form = ExpertForm::kFFN;  // moe.expert_form: "ffn" | "adapter"
  int64_t adapter_dim = 64;                   // moe.adapter_dim: adapter bottleneck width
  double adapter_scale = 1.0;  // moe.adapter_scale: lambda in A(z) = lambda W_up gelu(W_down z)

  // Each router's own keys (docs/routing.md, "Adding a router"): bound under "moe.<key>" for every config,
  // whichever router is picked, so that files, --set and to_toml see them; checked when it is picked.
  ExpertChoiceOptions expert_choice;
  LossFreeOptions loss_free;
  BipOptions bip;
  HierarchicalOptions hierarchical;
  MoceOptions moce;

  // Shapes after DeepSeekMoE fine-grained splitting: m*E experts of width F/m, m*K active.
  int64_t routed_experts() const { return n_expert * expert_split; }
  int64_t routed_used() const { return n_expert_used * expert_split; }
  int64_t routed_width() const { return d_expert / expert_split; }

  // Throws ConfigError naming the field when a value is out of range: the common keys here, the picked
  // router's own keys through its registry row (routing/registry.h).
  void validate() const;
  // When the picked router's setting pools each sequence's prompt (RouteContext::prompt_len), so that the
  // data must hold one instruction sample per row: the key that asks for it and what it does; {} if not.
  std::pair<std::string, std::string> prompt_rows() const;
};

class ConfigBinder;
// Registers every [moe] key of `cfg` under "moe.<key>": the common ones and each registered router's.
void bind_moe_config(ConfigBinder& binder, MoEConfig* cfg);

std::string to_string(ScoreFunc v);
std::string to_string(OverflowOrder v);
std::string to_string(ExpertAct v);
std::string to_string(ExpertsImplKind v);
std::string to_string(ExpertForm v);

}  // namespace moeforge
