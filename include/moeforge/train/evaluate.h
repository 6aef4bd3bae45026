// Evaluation of a language model on a split: loss / perplexity and the routing measures that tell routers
// apart (ROUTING.md section 9): MaxVio_global per layer and averaged, specialisation I(domain; expert) /
// H(domain) per layer, from (domain label, expert) counts over the whole evaluated set.
#pragma once

#include <nlohmann/json.hpp>

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
  nlohmann::json to_json() const;
};

// Runs the model in eval mode over `data` (in order, no shuffle) in batches of `batch_size`, at most
// `max_batches` batches (0 = all).
EvalResult evaluate(TransformerLM& model, const PackedData& data, int64_t batch_size, int64_t max_batches,
                    const std::string& split);

// Adds one plan's assignments to a layer's counts; `token_domain` [T] gives each token's domain id.
void accumulate_routing(LayerRouting& layer, const RoutingPlan& plan,
                        const std::vector<int64_t>& token_domain, int64_t n_domain);
// Fills max_vio_global and specialization from the counts.
void finish_routing(LayerRouting& layer);

}  // namespace moeforge
