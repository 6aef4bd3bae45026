// Evaluation of a language model on a split: loss / perplexity and the routing measures that tell routers
// apart (docs/routing.md section 9): MaxVio_global per layer and averaged, specialisation I(domain; expert) /
// H(domain) per layer, from (domain label, expert) counts over the whole evaluated set.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "moeforge/data/batching.h"
#include "moeforge/model/transformer.h"

namespace moeforge {

struct LayerRouting {
  std::vector<int64_t> load;                        // [E] assignments per expert over the set
  std::vector<std::vector<int64_t>> domain_expert;  // [D][E] assignments by domain label and expert
  double max_vio_global = 0;
  double specialization = 0;  // I(domain; expert) / H(domain)
  int64_t n_balanced = 0;     // MaxVio over the first n_balanced experts (RoutingStats::n_balanced; 0 = all)
  // Tokens routed and those given no expert at all (expert choice can leave a token with none; a capacity
  // can drop every assignment of a token): their output is the residual alone (docs/comparison.md).
  int64_t tokens = 0, unrouted = 0;
  double unrouted_share() const { return tokens > 0 ? double(unrouted) / double(tokens) : 0.0; }
};

struct EvalResult {
  std::string split;
  double loss = 0;  // mean next-token cross-entropy (nats)
  double perplexity = 0;
  int64_t tokens = 0;
  double max_vio_global = 0;  // averaged over MoE layers
  double specialization = 0;  // averaged over MoE layers
  std::vector<LayerRouting> layers;
  std::vector<std::string> domains;
  // Expert choice trained with batch grouping (docs/routing.md section 2): the loss of the same sequences
  // with batch routing (causal-safe grouping, or the non-causal one the model was trained with) and with
  // threshold routing, the only one generation can use. `loss` above is the one moe.ec_eval picks.
  bool has_ec = false;
  double ec_batch_loss = 0, ec_threshold_loss = 0;
  std::string eval_routing;                    // the routing `loss` was measured with (moe.ec_eval)
  std::map<std::string, double> routing_loss;  // loss under each evaluation routing the router offers
  // Pairs of rows of one batch that are windows of the same document, of all pairs: batch-routed expert
  // choice is causal on this set only when it is 0 (the evaluation batches interleave documents).
  int64_t same_document_row_pairs = 0, row_pairs = 0;
  double same_document_row_share() const {
    return row_pairs > 0 ? double(same_document_row_pairs) / double(row_pairs) : 0.0;
  }
  double ec_gap() const { return ec_threshold_loss - ec_batch_loss; }
  // Routers that put every token in a cluster (Router::token_clusters): tokens by (cluster the router
  // assigned, domain label), from the first MoE layer's assignment (the rule generation uses too), and the
  // clusters' purity: sum_c max_d n(c, d) / n.
  std::vector<std::vector<int64_t>> cluster_domain;  // [G][D], empty when the router has no clusters
  double cluster_purity = 0;
  nlohmann::json to_json() const;
};

// Purity of a [G][D] count table: sum over rows of the row maximum, over the total (0 when empty).
double table_purity(const std::vector<std::vector<int64_t>>& counts);

// What an evaluation routed, batch by batch, for a routing trace (model/trace.h): the batch, its inputs
// [B, S] and the forward's output (its plans). Called for the pass whose routing the measures report.
using EvalObserver =
    std::function<void(const Batcher::Batch& batch, const torch::Tensor& inputs, const LMOutput& out)>;

// Runs the model in eval mode over `data` (in order, no shuffle) in batches of `batch_size`, at most
// `max_batches` batches (0 = all). `observe`, when given, sees each batch of the measured pass.
EvalResult evaluate(TransformerLM& model, const PackedData& data, int64_t batch_size, int64_t max_batches,
                    const std::string& split, const EvalObserver& observe = {});

// Adds one plan's assignments to a layer's counts; `token_domain` [T] gives each token's domain id.
void accumulate_routing(LayerRouting& layer, const RoutingPlan& plan,
                        const std::vector<int64_t>& token_domain, int64_t n_domain);
// Fills max_vio_global and specialization from the counts.
void finish_routing(LayerRouting& layer);

}  // namespace moeforge
