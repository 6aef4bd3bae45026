// Per-token routing traces (trace.h; docs/serve.md, "Traces").
#include "moeforge/model/trace.h"

#include <cmath>
#include <stdexcept>

namespace moeforge {

namespace {

double rounded(double g) {
  return std::round(g * 1e6) / 1e6;
}

}  // namespace

nlohmann::json trace_header(const TransformerLMImpl& model, const std::string& source,
                            const std::vector<std::string>& domains) {
  nlohmann::json j = {{"moeforge_trace", 1}, {"source", source}};
  std::vector<int64_t> blocks;
  std::string router;
  int64_t n_expert = 0;
  int64_t i = 0;
  for (const auto& b : *model.blocks) {
    const auto* blk = b->as<BlockImpl>();
    ++i;
    if (!blk || !blk->moe) continue;
    blocks.push_back(i - 1);
    if (router.empty()) {
      router = blk->moe->router->name();
      n_expert = blk->moe->router->n_expert();
    }
  }
  j["router"] = router;
  j["n_expert"] = n_expert;
  j["moe_layers"] = blocks;
  j["n_layer"] = model.blocks->size();
  if (!domains.empty()) j["domains"] = domains;
  return j;
}

RoutingTracer::RoutingTracer(const TransformerLMImpl& model, const Tokenizer* tok) : tok_(tok) {
  int64_t i = 0;
  for (const auto& b : *model.blocks) {
    const auto* blk = b->as<BlockImpl>();
    ++i;
    if (!blk || !blk->moe) continue;
    blocks_.push_back(i - 1);
    routers_.push_back(blk->moe->router);
  }
}

void RoutingTracer::index(const LMOutput& out, int64_t n_tokens) {
  if (out.plans.size() != routers_.size())
    throw std::invalid_argument("routing trace: the forward has " + std::to_string(out.plans.size()) +
                                " routing plans for " + std::to_string(routers_.size()) + " MoE layers");
  routing_.assign(out.plans.size(), std::vector<TokenRouting>(size_t(n_tokens)));
  for (size_t l = 0; l < out.plans.size(); ++l) {
    const RoutingPlan& plan = out.plans[l];
    const auto off = plan.offsets();
    auto tok = plan.token_index.to(torch::kCPU, torch::kLong).contiguous();
    auto gate = plan.gate.detach().to(torch::kCPU, torch::kDouble).contiguous();
    const int64_t* t = tok.data_ptr<int64_t>();
    const double* g = gate.data_ptr<double>();
    for (int64_t e = 0; e + 1 < int64_t(off.size()); ++e)
      for (int64_t i = off[e]; i < off[e + 1]; ++i) {
        if (t[i] < 0 || t[i] >= n_tokens)
          throw std::invalid_argument("routing trace: layer " + std::to_string(blocks_[l]) +
                                      "'s plan names token " + std::to_string(t[i]) + " of " +
                                      std::to_string(n_tokens));
        routing_[l][t[i]].experts.push_back(e);  // e ascends: each token's experts come sorted
        routing_[l][t[i]].gates.push_back(rounded(g[i]));
      }
  }
}

std::string RoutingTracer::piece(int64_t row, int64_t pos) {
  const auto& ids = history_[row];
  const int64_t id = ids[pos];
  if (id == tok_->bos_id()) return "<s>";
  if (id == tok_->eos_id()) return "</s>";
  // What decoding the token after a few tokens of its context adds to decoding that context alone: its
  // text with the space SentencePiece puts before a word, but none at a sequence's start.
  const int64_t from = std::max<int64_t>(0, pos - 8);
  const std::vector<int64_t> before(ids.begin() + from, ids.begin() + pos);
  const std::vector<int64_t> with(ids.begin() + from, ids.begin() + pos + 1);
  const std::string a = tok_->decode(before), b = tok_->decode(with);
  if (b.size() >= a.size() && b.compare(0, a.size(), a) == 0) return b.substr(a.size());
  return tok_->decode({id});
}

std::vector<nlohmann::json> RoutingTracer::step(const torch::Tensor& input, int64_t start,
                                                const LMOutput& out,
                                                const std::vector<nlohmann::json>& row_fields,
                                                int64_t prompt_len) {
  auto in = input.to(torch::kCPU, torch::kLong).contiguous();
  if (in.dim() != 2) throw std::invalid_argument("routing trace: the input must be [B, S]");
  const int64_t B = in.size(0), S = in.size(1);
  if (!row_fields.empty() && int64_t(row_fields.size()) != B)
    throw std::invalid_argument("routing trace: " + std::to_string(row_fields.size()) +
                                " row field sets for " + std::to_string(B) + " rows");
  index(out, B * S);
  if (start == 0) history_.assign(size_t(B), {});
  if (int64_t(history_.size()) != B)
    throw std::invalid_argument("routing trace: a forward of " + std::to_string(B) + " rows continues " +
                                std::to_string(history_.size()));
  const int64_t* ids = in.data_ptr<int64_t>();
  std::vector<nlohmann::json> records;
  records.reserve(size_t(B * S));
  for (int64_t b = 0; b < B; ++b) {
    if (int64_t(history_[b].size()) != start)
      throw std::invalid_argument("routing trace: row " + std::to_string(b) + " has " +
                                  std::to_string(history_[b].size()) + " tokens, the forward starts at " +
                                  std::to_string(start));
    for (int64_t s = 0; s < S; ++s) {
      const int64_t t = b * S + s, pos = start + s;
      history_[b].push_back(ids[t]);
      nlohmann::json r = {{"seq", b}, {"pos", pos}, {"id", ids[t]}};
      if (tok_) r["text"] = piece(b, pos);
      if (pos < prompt_len) r["prompt"] = true;
      if (!row_fields.empty())
        for (auto& [k, v] : row_fields[b].items()) r[k] = v;
      nlohmann::json layers = nlohmann::json::array();
      for (size_t l = 0; l < routing_.size(); ++l) {
        const auto& tr = routing_[l][t];
        nlohmann::json e = {{"layer", blocks_[l]}, {"experts", tr.experts}, {"gates", tr.gates}};
        const nlohmann::json fields =
            routers_[l]->trace_fields(out.plans[l], t, tr.experts);  // items() refers into it
        for (auto& [k, v] : fields.items()) e[k] = v;
        layers.push_back(std::move(e));
      }
      r["layers"] = std::move(layers);
      records.push_back(std::move(r));
    }
  }
  return records;
}

nlohmann::json RoutingTracer::unrouted(int64_t id, int64_t pos) {
  if (history_.empty()) history_.assign(1, {});
  if (int64_t(history_[0].size()) != pos)
    throw std::invalid_argument("routing trace: an unrouted token at position " + std::to_string(pos) +
                                " after " + std::to_string(history_[0].size()) + " tokens");
  history_[0].push_back(id);
  nlohmann::json r = {{"seq", 0}, {"pos", pos}, {"id", id}};
  if (tok_) r["text"] = piece(0, pos);
  r["routed"] = false;
  r["layers"] = nlohmann::json::array();
  return r;
}

}  // namespace moeforge
