#include "moeforge/train/evaluate.h"

#include <cmath>

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

EvalResult evaluate(TransformerLM& model, const PackedData& data, int64_t batch_size, int64_t max_batches,
                    const std::string& split) {
  EvalResult r;
  r.split = split;
  r.domains = data.domains;
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard ng;
  Batcher batcher(data, batch_size, 0, /*shuffle=*/false);
  const int64_t n_batches =
      max_batches > 0 ? std::min(max_batches, batcher.batches_per_epoch()) : batcher.batches_per_epoch();
  double loss_sum = 0;
  for (int64_t b = 0; b < n_batches; ++b) {
    auto batch = batcher.next();
    const int64_t B = batch.tokens.size(0), S = batch.tokens.size(1) - 1;
    auto inputs = batch.tokens.narrow(1, 0, S);
    auto targets = batch.tokens.narrow(1, 1, S);
    RouteContext ctx;
    ctx.seq_domain = batch.domain;
    auto out = model->forward(inputs, ctx);
    auto ce = torch::nn::functional::cross_entropy(
        out.logits.reshape({B * S, -1}), targets.reshape(-1),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    loss_sum += ce.item<double>();
    r.tokens += B * S;
    std::vector<int64_t> token_domain(B * S);
    auto dom = batch.domain.to(torch::kCPU).contiguous();
    for (int64_t t = 0; t < B * S; ++t) token_domain[t] = dom.data_ptr<int64_t>()[t / S];
    if (r.layers.size() < out.plans.size()) r.layers.resize(out.plans.size());
    for (size_t l = 0; l < out.plans.size(); ++l)
      accumulate_routing(r.layers[l], out.plans[l], token_domain, int64_t(data.domains.size()));
  }
  r.loss = r.tokens > 0 ? loss_sum / double(r.tokens) : 0.0;
  r.perplexity = std::exp(r.loss);
  for (auto& l : r.layers) {
    finish_routing(l);
    r.max_vio_global += l.max_vio_global / double(r.layers.size());
    r.specialization += l.specialization / double(r.layers.size());
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
  return {{"split", split},
          {"loss", loss},
          {"perplexity", perplexity},
          {"tokens", tokens},
          {"max_vio_global", max_vio_global},
          {"specialization", specialization},
          {"domains", domains},
          {"layers", layers_json}};
}

}  // namespace moeforge
