// Stage 1 of the MoE layer (docs/routing.md section 0, "four stages"): the router contract.
//
// Legend: T tokens (B sequences of S positions), C model width, E routed experts, K experts per token,
// N assignments kept (varies by router; a token may have 0..E of them).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/routing/feedback.h"
#include "moeforge/routing/stats.h"

namespace moeforge {

// What a router passes on (docs/routing.md, "Router state"): to the next MoE layer's router in the same
// forward (RoutingPlan::carry -> RouteContext::carry), and to the same layer's router at the next step of a
// KV-cached generation (RoutingPlan::cache -> KVCache -> RouteContext::cache). The router that makes one
// defines its type; the layer, the model and the KV cache hold it without reading it.
struct RouterState {
  virtual ~RouterState() = default;
};
using RouterStatePtr = std::shared_ptr<const RouterState>;

// What a router may need beyond x.
struct RouteContext {
  int64_t n_seq = 1;    // B
  int64_t seq_len = 0;  // S (0: the whole batch is one sequence, S = T)
  // [B] int64, optional: how many leading positions of each sequence (counted from its start, positions
  // already in a KV cache included) are its prompt (instruction data: <s>, instruction and input; the
  // prompt of a generation). Undefined for plain text.
  torch::Tensor prompt_len;
  bool training = false;
  // Token-by-token generation: a router must route each token alone (expert choice uses its thresholds,
  // whatever ec_eval says: a batch of one position would give it no experts).
  bool generating = false;
  RouterStatePtr carry;  // what the previous MoE layer's router passed on in this forward (null: first)
  RouterStatePtr cache;  // what this layer's router passed on at the previous generation step (null: none)
};

// The result of routing one batch: assignments grouped by expert. The router is its only writer.
struct RoutingPlan {
  torch::Tensor token_index;     // [N] int64: token of each assignment, grouped by expert, ascending inside
  torch::Tensor expert_offsets;  // [E+1] int64 on CPU: assignments of expert e are [off[e], off[e+1])
  torch::Tensor gate;            // [N] float: differentiable gate weight g >= 0
  torch::Tensor aux_loss;        // scalar: the router's auxiliary loss (zero if none, and zero from the
                           // token-choice routers in inference: not training, grad mode off), differentiable
  RoutingStats stats;

  // Optional.
  torch::Tensor scores;  // [T, E] detached router scores, for state updates that need them (BIP, EC)
  // [T] float, differentiable: a per-token scale of the routed output that MoELayer's combine step applies
  // (ClusterMoE's adaptive routing weight a(x) = sigmoid(w.x)); undefined = 1.
  torch::Tensor token_scale;
  // Per-sequence rows ([B, ...] each, detached) the router wants back in after_step, in an order it
  // defines: RouteFeedback keeps them per micro-batch, and in data parallelism every rank's rows
  // (feedback.h). MoCE: its sequence representations and their clusters.
  std::vector<torch::Tensor> sequence_rows;
  RouterStatePtr carry;  // for the next MoE layer's router in this forward (RouteContext::carry)
  RouterStatePtr cache;  // for this layer's router at the next generation step (RouteContext::cache)

  int64_t n_expert() const { return expert_offsets.numel() - 1; }
  int64_t n_assign() const { return token_index.numel(); }
  std::vector<int64_t> offsets() const;  // expert_offsets as a vector
  // Of the first n_tokens tokens, those with no assignment kept: expert choice can leave a token without
  // an expert, a capacity can drop all of a token's choices (their layer output is the residual alone).
  int64_t unrouted_tokens(int64_t n_tokens) const;
};

// Every router implements this; a model only ever sees a Router. Router state that must survive a
// checkpoint (loss-free bias, BIP dual, reliabilities, centroids, EC thresholds) is held in registered
// buffers (register_buffer), so that saving named_parameters() and named_buffers() saves all of it.
class Router : public torch::nn::Module {
 public:
  // x: [T, C] the FFN input after its norm.
  virtual RoutingPlan route(const torch::Tensor& x, const RouteContext& ctx) = 0;
  // Called once after the optimiser step with what the step taught (feedback.h): the plans of every
  // micro-batch routed in training since the last call, their expert health and token losses. Loss-free
  // bias, BIP dual, EC thresholds, reliabilities, online centroids and utilisation counters move here and
  // nowhere else: route() never changes a buffer, in training or evaluation (docs/routing.md).
  virtual void after_step(const RouteFeedback& /*feedback*/) {}
  // Routers that track expert health (reliability) ask MoELayer to measure it (RouteFeedback::add_health).
  virtual bool wants_expert_health() const { return false; }
  virtual int64_t n_expert() const = 0;
  virtual std::string name() const = 0;
  // Whether a position's routing depends only on positions <= it in its own sequence, in training and in
  // evaluation, in the router's current setting (docs/routing.md, "Which settings are causal").
  virtual bool causal() const { return true; }

  // The [T, E] scores (detached) that an assignment of x is measured against by the optimality gap: the
  // router's own probability of each (token, expert) pair, without any balancing bias. `plan` is the plan
  // route() made for x (a router whose scores depend on its choices, MoCE's groups, reads it).
  virtual torch::Tensor assignment_scores(const torch::Tensor& x, const RoutingPlan& plan) = 0;
  // Whether, in inference and in its current state, the router computes exactly token-choice top-K of the
  // scores of its own [E, C] parameter "weight" (no capacity, no selection bias, nothing from other tokens
  // or sequences): the routing that Mixtral-style formats (Hugging Face, GGUF) express. Empty when it does;
  // otherwise why not, starting with the config key to blame ("moe.bip_mode: ..."). Score function and
  // gate normalisation are the format's to check (moe.score, moe.renormalize).
  virtual std::string top_k_obstacle() const {
    return "moe.router: its routing depends on more than the token's own top-K (batch, clusters or sequence "
           "state)";
  }
  // Evaluation routings this router can switch between (expert choice: "batch" and "threshold"); an
  // evaluator reports the loss under each. Empty when there is one.
  virtual std::vector<std::string> eval_routings() const { return {}; }
  virtual std::string eval_routing() const { return {}; }
  virtual void set_eval_routing(const std::string& /*routing*/) {}
  // A description of the router's state for `inspect` (utilisation, reliability, thresholds, ...).
  virtual nlohmann::json describe_state() const;
  // Zeroes the utilisation counters (not the routing state: bias, dual, reliabilities stay).
  virtual void reset_counters() {}

  // The cluster (expert group) each token of `plan` was routed in, [T] int64 on CPU, for routers whose
  // first stage puts every token in one cluster (MoCE); undefined for the others. Evaluation's cluster x
  // domain table and the instruction report read it.
  virtual torch::Tensor token_clusters(const RoutingPlan& /*plan*/) const { return {}; }

  // What this router adds to one token's entry of a routing trace (docs/serve.md, "Traces"), beyond the
  // experts and gates every trace has: `token` indexes the tokens of `plan` (a plan this router made), and
  // `experts` are that token's assignments in the plan, ascending. MoCE: the token's cluster; hierarchical:
  // its clusters and their and its experts' reliabilities; expert choice: the thresholds and the token's
  // scores of its experts; loss-free and BIP: the bias or dual of its experts. A JSON object, empty (the
  // default) when there is nothing more. The trace (model/trace.h) asks every router, so a new router's
  // fields need no edit outside its own files.
  virtual nlohmann::json trace_fields(const RoutingPlan& plan, int64_t token,
                                      const std::vector<int64_t>& experts) const;

  // Offline sequence clustering before training (docs/routing.md section 6), for routers that assign
  // sequences to clusters by centroids. offline_clustering() says whether the config asks for it and how;
  // sequence_representation() is the [B, C] vector per sequence that the router assigns by, read from
  // the plan it made; set_sequence_centroids() hands it the clustering's centroids [G, C], their sizes [G]
  // and the mean [C] the space was centred on. The default throws ConfigError naming `key`.
  struct OfflineClustering {
    std::string method;        // "hidden": k-means on sequence_representation(); "tfidf": on the words
    std::string key;           // the config key that asks for it, for errors
    int64_t n_cluster = 0;     // G
    bool prompt_only = false;  // instruction data: only the prompt's words and positions make the cluster
  };
  virtual std::optional<OfflineClustering> offline_clustering() const { return std::nullopt; }
  virtual torch::Tensor sequence_representation(const RoutingPlan& /*plan*/) const { return {}; }
  virtual void set_sequence_centroids(const torch::Tensor& centroids, const torch::Tensor& sizes,
                                      const torch::Tensor& mean, const std::string& key);

  // Pruning (docs/routing.md section 5): active [E], 1 = routable, 0 = removed from routing. A pruned expert
  // gets no assignment; only the *selection* is masked, the scores are not, so the gates of the other experts
  // are unchanged and pruning an expert that no token chose leaves the layer's output unchanged. The mask
  // is the buffer "expert_active", so a pruned checkpoint keeps it. Throws std::invalid_argument (naming
  // the layer's router) when the shape is wrong or too few experts would remain to route a token.
  virtual void set_expert_mask(const torch::Tensor& active);
  virtual torch::Tensor expert_mask() const;  // [E] float on CPU, 1 = routable
  std::vector<int64_t> pruned_experts() const;

 protected:
  // Registers the [E] "expert_active" buffer (all ones); every router but the hierarchical one (which has
  // its own, with the same name) calls it in its constructor.
  void register_expert_mask(int64_t n_expert);
  // The fewest routable experts this router needs (top-K needs K). Used by the default set_expert_mask.
  virtual int64_t min_active_experts() const { return 1; }
  bool has_pruned() const;  // any expert masked out
  // [E] additive selection bias on `like`'s device and dtype: 0 for a routable expert, -inf for a pruned one.
  torch::Tensor selection_mask_bias(const torch::Tensor& like) const;
  torch::Tensor expert_active_;  // [E] buffer
};

// Makes a plan from per-token choices.
//   expert [T, K] int64 (CPU), rank order = priority order (column 0 = first choice)
//   keep   [T, K] bool (CPU): the choice is requested (false = not asked for, e.g. GShard random drop)
//   priority [T] float (CPU), optional: if defined, tokens inside one rank are served by descending
//            priority (Switch batch-prioritised routing); otherwise in token order
//   gate_tk [T, K] float: differentiable gate of each choice
//   capacity: max assignments per expert, <= 0 for none (dropless)
// Assignments are grouped by expert with a counting sort, in ascending token order within an expert.
RoutingPlan build_plan_from_choices(const torch::Tensor& expert, const torch::Tensor& keep,
                                    const torch::Tensor& priority, const torch::Tensor& gate_tk,
                                    int64_t n_expert, int64_t capacity);
// The same with a capacity per expert ([E], each <= 0 for none).
RoutingPlan build_plan_from_choices(const torch::Tensor& expert, const torch::Tensor& keep,
                                    const torch::Tensor& priority, const torch::Tensor& gate_tk,
                                    int64_t n_expert, const std::vector<int64_t>& capacity);

// cap = ceil(CF * T * K / E), docs/routing.md section 1; 0 when CF = 0 (dropless).
int64_t expert_capacity(double capacity_factor, int64_t n_tokens, int64_t k, int64_t n_expert);

}  // namespace moeforge
