#include "moeforge/train/evaluate.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "moeforge/routing/stats.h"

namespace moeforge {

void accumulate_routing(LayerRouting& layer, const RoutingPlan& plan,
                        const std::vector<int64_t>& token_domain, int64_t n_domain) {
  const int64_t E = plan.n_expert();
  if (layer.load.empty()) {
    layer.load.assign(E, 0);
    layer.n_balanced = plan.stats.n_balanced;
    layer.domain_expert.assign(n_domain, std::vector<int64_t>(E, 0));
  }
  const auto off = plan.offsets();
  auto tok = plan.token_index.to(torch::kCPU).contiguous();
  const int64_t* t = tok.data_ptr<int64_t>();
  layer.tokens += int64_t(token_domain.size());
  layer.unrouted += plan.unrouted_tokens(int64_t(token_domain.size()));
  for (int64_t e = 0; e < E; ++e) {
    layer.load[e] += off[e + 1] - off[e];
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      const int64_t d = token_domain[t[i]];
      if (d >= 0 && d < n_domain) ++layer.domain_expert[d][e];
    }
  }
}

void finish_routing(LayerRouting& layer) {
  // MaxVio over the experts the router balances (RoutingStats::n_balanced: without experts every token uses).
  const size_t n_bal = layer.n_balanced > 0 ? size_t(layer.n_balanced) : layer.load.size();
  std::vector<double> load(layer.load.begin(),
                           layer.load.begin() + int64_t(std::min(n_bal, layer.load.size())));
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
                     bool measure, EvalResult& r, const EvalObserver& observe = {}) {
  // Rows of one batch are windows of different documents (Batcher::Order::kInterleaved), so that a
  // router that lets rows see each other (batch-routed expert choice) never sees a row's continuation.
  Batcher batcher(data, batch_size, Batcher::Order::kInterleaved);
  const int64_t n_batches =
      max_batches > 0 ? std::min(max_batches, batcher.batches_per_epoch()) : batcher.batches_per_epoch();
  const int64_t n_domain = int64_t(data.domains.size());
  double loss_sum = 0;
  int64_t tokens = 0;
  for (int64_t b = 0; b < n_batches; ++b) {
    auto batch = batcher.next();
    const int64_t B = batch.tokens.size(0), S = batch.tokens.size(1) - 1;
    auto inputs = batch.tokens.narrow(1, 0, S);
    auto targets = batch.tokens.narrow(1, 1, S);
    RouteContext ctx;
    ctx.prompt_len = batch.prompt_len;  // instruction rows of one sample: a router may pool the prompt
    auto out = model->forward(inputs, ctx);
    if (batch.weight.defined()) {
      // Instruction data: the loss and perplexity of the response tokens only (docs/instruct-data.md).
      auto ce = torch::nn::functional::cross_entropy(
          out.logits.reshape({B * S, -1}), targets.reshape(-1),
          torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));  // [B*S]
      auto w = batch.weight.reshape(-1).to(ce.device(), ce.scalar_type());            // [B*S]
      loss_sum += (ce * w).sum().item<double>();
      tokens += static_cast<int64_t>(std::llround(w.sum().item<double>()));
    } else {
      auto ce = torch::nn::functional::cross_entropy(
          out.logits.reshape({B * S, -1}), targets.reshape(-1),
          torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
      loss_sum += ce.item<double>();
      tokens += B * S;
    }
    if (batch.doc.defined()) {
      auto doc = batch.doc.contiguous();
      const int64_t* dp = doc.data_ptr<int64_t>();
      for (int64_t i = 0; i < B; ++i)
        for (int64_t j = i + 1; j < B; ++j) {
          ++r.row_pairs;
          r.same_document_row_pairs += dp[i] == dp[j];
        }
    }
    if (!measure) continue;
    if (observe) observe(batch, inputs, out);
    auto dom = batch.domain.to(torch::kCPU).contiguous();  // [B]
    const int64_t* d = dom.data_ptr<int64_t>();
    std::vector<int64_t> token_domain(B * S);
    for (int64_t t = 0; t < B * S; ++t) token_domain[t] = d[t / S];
    if (r.layers.size() < out.plans.size()) r.layers.resize(out.plans.size());
    for (size_t l = 0; l < out.plans.size(); ++l)
      accumulate_routing(r.layers[l], out.plans[l], token_domain, n_domain);
    // Routers that put every token in a cluster (Router::token_clusters): tokens by (cluster the first MoE
    // layer assigned, domain label).
    const auto clusters = out.plans.empty()
                              ? torch::Tensor()
                              : model->moe_layers().front()->router->token_clusters(out.plans[0]);
    if (clusters.defined()) {
      if (r.cluster_domain.empty())
        r.cluster_domain.assign(size_t(model->moe_config().n_cluster), std::vector<int64_t>(n_domain, 0));
      auto c = clusters.to(torch::kCPU, torch::kLong).contiguous();  // [T]
      const int64_t* cp = c.data_ptr<int64_t>();
      for (int64_t t = 0; t < B * S; ++t) {
        const int64_t dt = token_domain[t];
        if (dt >= 0 && dt < n_domain && cp[t] >= 0 && cp[t] < int64_t(r.cluster_domain.size()))
          ++r.cluster_domain[cp[t]][dt];
      }
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
                    const std::string& split, const EvalObserver& observe) {
  EvalResult r;
  r.split = split;
  r.domains = data.domains;
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard ng;
  evaluation_pass(model, data, batch_size, max_batches, /*measure=*/true, r, observe);
  for (auto& l : r.layers) {
    finish_routing(l);
    r.max_vio_global += l.max_vio_global / double(r.layers.size());
    r.specialization += l.specialization / double(r.layers.size());
  }
  r.cluster_purity = table_purity(r.cluster_domain);

  // Routers with more than one evaluation routing (expert choice trained with batch routing: batch and
  // threshold): the loss under each, so that both and their gap are reported (docs/routing.md section 2).
  std::vector<std::shared_ptr<Router>> multi;
  for (auto& l : model->moe_layers())
    if (!l->router->eval_routings().empty()) multi.push_back(l->router);
  if (!multi.empty()) {
    const std::string configured = multi.front()->eval_routing();
    r.eval_routing = configured;
    for (const auto& routing : multi.front()->eval_routings()) {
      if (routing == configured) {
        r.routing_loss[routing] = r.loss;
        continue;
      }
      for (auto& m : multi) m->set_eval_routing(routing);
      EvalResult o;
      try {
        evaluation_pass(model, data, batch_size, max_batches, /*measure=*/false, o);
      } catch (...) {
        for (auto& m : multi) m->set_eval_routing(configured);
        throw;
      }
      for (auto& m : multi) m->set_eval_routing(configured);
      r.routing_loss[routing] = o.loss;
    }
    if (r.routing_loss.count("batch") && r.routing_loss.count("threshold")) {
      r.has_ec = true;
      r.ec_batch_loss = r.routing_loss["batch"];
      r.ec_threshold_loss = r.routing_loss["threshold"];
    }
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
                           {"unrouted_share", l.unrouted_share()},
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
    j["eval_routing"] = eval_routing;
  }
  // Batch-routed expert choice lets a batch's rows see each other: it is causal only when no two rows are
  // windows of the same document. The share of row pairs that are says how independent they were.
  j["same_document_row_share"] = same_document_row_share();
  if (!cluster_domain.empty()) {
    j["cluster_domain"] = cluster_domain;
    j["cluster_purity"] = cluster_purity;
  }
  return j;
}

}  // namespace moeforge
