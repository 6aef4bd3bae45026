// Per-token routing traces (docs/serve.md, "Traces"): which experts each token used, layer by layer, with
// their gates and what the router adds (Router::trace_fields), as JSON lines. `generate --trace` and
// `eval --trace` write them from the plans of the forwards they ran (GenerateHooks::on_step, EvalObserver),
// so a trace is the routing the model used; `trace-view` draws them (experiments/trace_page.h) and `serve`
// returns them on request.
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

#include "moeforge/data/tokenizer.h"
#include "moeforge/model/transformer.h"

namespace moeforge {

// The first line of a trace file: {"moeforge_trace": 1, "source", "router", "n_expert", "moe_layers" (the
// block index of each MoE layer), "n_layer", "domains" (when given)}. Every later line is one token.
nlohmann::json trace_header(const TransformerLMImpl& model, const std::string& source,
                            const std::vector<std::string>& domains = {});

// Turns the plans of forwards into token records:
//   {"seq": b, "pos": p, "id": id, "text": piece, ["prompt": true], <row fields>,
//    "layers": [{"layer": block, "experts": [e...], "gates": [g...], <router's trace_fields>}, ...]}
// Experts ascend; gates are the plan's gates (before a router's token scale) rounded to 1e-6.
class RoutingTracer {
 public:
  // `tok` (may be null: no "text") decodes each token's piece in its context (a leading space where it
  // starts a word); it must outlive the tracer, and so must the model.
  RoutingTracer(const TransformerLMImpl& model, const Tokenizer* tok);

  // The records of one forward: `input` [B, S] int64 its tokens, `start` the position of input[:, 0] (a
  // generation's later steps continue after the cache; a new forward at 0 starts new rows), `out` its
  // output. `row_fields`, when not empty, holds B objects merged into every record of their row
  // (evaluation: the document and its domain). Positions below `prompt_len` are marked "prompt".
  std::vector<nlohmann::json> step(const torch::Tensor& input, int64_t start, const LMOutput& out,
                                   const std::vector<nlohmann::json>& row_fields = {},
                                   int64_t prompt_len = 0);

  // A token of row 0 that no forward routed (the last token a generation picked): its record has
  // "routed": false and no layers.
  nlohmann::json unrouted(int64_t id, int64_t pos);

 private:
  std::string piece(int64_t row, int64_t pos);  // history_[row][pos]'s text in its context
  // Per MoE layer of `out`: each of its n_tokens tokens' experts and gates, from the plan.
  void index(const LMOutput& out, int64_t n_tokens);
  const Tokenizer* tok_;
  std::vector<int64_t> blocks_;                   // block index of each MoE layer
  std::vector<std::shared_ptr<Router>> routers_;  // its router
  std::vector<std::vector<int64_t>> history_;     // per row, the tokens seen so far
  struct TokenRouting {
    std::vector<int64_t> experts;
    std::vector<double> gates;
  };
  std::vector<std::vector<TokenRouting>> routing_;  // [layer][token] of the last forward
};

}  // namespace moeforge
