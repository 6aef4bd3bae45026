#include "moeforge/train/evaluate.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "moeforge/routing/expert_choice.h"
#include "moeforge/routing/moce.h"
#include "moeforge/routing/stats.h"

namespace moeforge {

void accumulate_routing(LayerRouting& layer, const RoutingPlan& plan,
                        const std::vector<int64_t>& token_domain, int64_t n_domain) {
  const int64_t E = plan.n_expert();
  if (layer.load.empty()) {
    layer.load.assign(E, 0);
    layer.domain_expert.assign(n_domain, std::vector<int64_t>(E, 0));
  }
  const auto off = plan.offsets();
  auto tok = plan.token_index.to(torch::kCPU).contiguous();
  const int64_t* t = tok.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    layer.load[e] += off[e + 1] - off[e];
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      const int64_t d = token_domain[t[i]];
      if (d >= 0 && d < n_domain) ++layer.domain_expert[d][e];
    }
  }
}

void finish_routing(LayerRouting& layer) {
  std::vector<double> load(layer.load.begin(), layer.load.end());
  layer.max_vio_global = max_violation(load);
  // I(D; E) / H(D) from the joint counts.
  double total = 0;
  const size_t D = layer.domain_expert.size(), E = layer.load.size();
  std::vector<double> pd(D, 0), pe(E, 0);
  for (size_t d = 0; d < D; ++d)
    for (size_t e = 0; e < E; ++e) {
      const double n = double(layer.domain_expert[d][e]);
      total += n;
      pd[d] += n;
      pe[e] += n;
    }
  if (total <= 0) return;
  double mi = 0, hd = 0;
  for (size_t d = 0; d < D; ++d) {
    if (pd[d] > 0) hd -= pd[d] / total * std::log(pd[d] / total);
    for (size_t e = 0; e < E; ++e) {
      const double n = double(layer.domain_expert[d][e]);
      if (n > 0) mi += n / total * std::log(n * total / (pd[d] * pe[e]));
    }
  }
  layer.specialization = hd > 0 ? mi / hd : 0.0;
}

namespace {

// One pass over the set: sums the loss into r (loss, perplexity, tokens) and, with `measure`, the routing
// counts and the cluster x domain table.
void evaluation_pass(TransformerLM& model, const PackedData& data, int64_t batch_size, int64_t max_batches,
                     bool measure, EvalResult& r) {
  Batcher batcher(data, batch_size, 0, /*shuffle=*/false);
  const int64_t n_batches =
      max_batches > 0 ? std::min(max_batches, batcher.batches_per_epoch()) : batcher.batches_per_epoch();
  const int64_t n_domain = int64_t(data.domains.size());
  int64_t n_cluster = 0;
  for (auto& l : model->moe_layers()) {
    if (auto m = std::dynamic_pointer_cast<MoCERouterImpl>(l->router)) n_cluster = m->n_cluster();
    break;  // the first MoE layer assigns the clusters every later layer keeps
  }
  if (measure && n_cluster > 0) r.cluster_domain.assign(n_cluster, std::vector<int64_t>(n_domain, 0));
  double loss_sum = 0;
  int64_t tokens = 0;
  for (int64_t b = 0; b < n_batches; ++b) {
    auto batch = batcher.next();
    const int64_t B = batch.tokens.size(0), S = batch.tokens.size(1) - 1;
    auto inputs = batch.tokens.narrow(1, 0, S);
    auto targets = batch.tokens.narrow(1, 1, S);
    RouteContext ctx;
    ctx.seq_domain = batch.domain;
    // No ctx.seq_cluster even when training had offline clusters: evaluation assigns each sequence to its
    // nearest centroid, as generation must (ROUTING.md section 6).
    auto out = model->forward(inputs, ctx);
    auto ce = torch::nn::functional::cross_entropy(
        out.logits.reshape({B * S, -1}), targets.reshape(-1),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    loss_sum += ce.item<double>();
    tokens += B * S;
    if (!measure) continue;
    auto dom = batch.domain.to(torch::kCPU).contiguous();  // [B]
    const int64_t* d = dom.data_ptr<int64_t>();
    std::vector<int64_t> token_domain(B * S);
    for (int64_t t = 0; t < B * S; ++t) token_domain[t] = d[t / S];
    if (r.layers.size() < out.plans.size()) r.layers.resize(out.plans.size());
    for (size_t l = 0; l < out.plans.size(); ++l)
      accumulate_routing(r.layers[l], out.plans[l], token_domain, n_domain);
    if (n_cluster > 0 && !out.plans.empty() && out.plans[0].seq_cluster.defined()) {
      auto c = out.plans[0].seq_cluster.to(torch::kCPU, torch::kLong).contiguous();  // [B]
      for (int64_t i = 0; i < B; ++i)
        if (d[i] >= 0 && d[i] < n_domain) ++r.cluster_domain[c.data_ptr<int64_t>()[i]][d[i]];
    }
  }
  r.tokens = tokens;
  r.loss = tokens > 0 ? loss_sum / double(tokens) : 0.0;
  r.perplexity = std::exp(r.loss);
}

}  // namespace

double table_purity(const std::vector<std::vector<int64_t>>& counts) {
  int64_t total = 0, best = 0;
  for (const auto& row : counts) {
    int64_t m = 0;
    for (int64_t n : row) {
      total += n;
      m = std::max(m, n);
    }
    best += m;
  }
  return total > 0 ? double(best) / double(total) : 0.0;
}

EvalResult evaluate(TransformerLM& model, const PackedData& data, int64_t batch_size, int64_t max_batches,
                    const std::string& split) {
  EvalResult r;
  r.split = split;
  r.domains = data.domains;
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard ng;
  evaluation_pass(model, data, batch_size, max_batches, /*measure=*/true, r);
  for (auto& l : r.layers) {
    finish_routing(l);
    r.max_vio_global += l.max_vio_global / double(r.layers.size());
    r.specialization += l.specialization / double(r.layers.size());
  }
  r.cluster_purity = table_purity(r.cluster_domain);

  // Expert choice trained with batch routing: the other evaluation routing too, so that both losses and
  // their gap are reported (ROUTING.md section 2). A model trained with ec_mode = threshold has one routing.
  std::vector<std::shared_ptr<ExpertChoiceRouterImpl>> ec;
  for (auto& l : model->moe_layers())
    if (auto e = std::dynamic_pointer_cast<ExpertChoiceRouterImpl>(l->router))
      if (e->config_mode() != ECMode::kThreshold) ec.push_back(e);
  if (!ec.empty()) {
    const ECEval configured = ec.front()->eval_routing();
    const ECEval other = configured == ECEval::kBatch ? ECEval::kThreshold : ECEval::kBatch;
    for (auto& e : ec) e->set_eval_routing(other);
    EvalResult o;
    try {
      evaluation_pass(model, data, batch_size, max_batches, /*measure=*/false, o);
    } catch (...) {
      for (auto& e : ec) e->set_eval_routing(configured);
      throw;
    }
    for (auto& e : ec) e->set_eval_routing(configured);
    r.has_ec = true;
    r.ec_batch_loss = configured == ECEval::kBatch ? r.loss : o.loss;
    r.ec_threshold_loss = configured == ECEval::kBatch ? o.loss : r.loss;
  }
  if (was_training) model->train();
  return r;
}

nlohmann::json EvalResult::to_json() const {
  nlohmann::json layers_json = nlohmann::json::array();
  for (auto& l : layers)
    layers_json.push_back({{"load", l.load},
                           {"max_vio_global", l.max_vio_global},
                           {"specialization", l.specialization},
                           {"domain_expert", l.domain_expert}});
  nlohmann::json j = {{"split", split},
                      {"loss", loss},
                      {"perplexity", perplexity},
                      {"tokens", tokens},
                      {"max_vio_global", max_vio_global},
                      {"specialization", specialization},
                      {"domains", domains},
                      {"layers", layers_json}};
  if (has_ec) {
    j["ec_batch_loss"] = ec_batch_loss;
    j["ec_threshold_loss"] = ec_threshold_loss;
    j["ec_gap"] = ec_gap();
  }
  if (!cluster_domain.empty()) {
    j["cluster_domain"] = cluster_domain;
    j["cluster_purity"] = cluster_purity;
  }
  return j;
}

}  // namespace moeforge
