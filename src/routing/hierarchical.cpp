// Hierarchical cluster routing, docs/routing.md section 5. See the header for the legend.
#include "moeforge/routing/hierarchical.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "moeforge/config/binder.h"
#include "moeforge/routing/losses.h"
#include "option_checks.h"

namespace moeforge {

namespace {

// r never reaches 0, so log r stays finite and a recovered expert can come back (r in (0, 1]).
constexpr double kMinReliability = 1e-4;
// An expert is penalised for the loss of its tokens only when it exceeds the layer mean by this factor:
// experts naturally serve tokens of different difficulty, and a small excess is not a fault.
constexpr double kLossTolerance = 1.5;

}  // namespace

HierarchicalRouterImpl::HierarchicalRouterImpl(const MoEConfig& cfg, int64_t d_model)
    : cfg_(cfg),
      n_expert_(cfg.routed_experts()),
      n_cluster_(cfg.n_cluster),
      n_per_cluster_(cfg.routed_experts() / std::max<int64_t>(cfg.n_cluster, 1)),
      k_cluster_(cfg.hierarchical.n_cluster_used),
      k_expert_(cfg.routed_used()) {
  // nn.Linear's default initialisation U(-1/sqrt(C), 1/sqrt(C)) for both stages, as the top-K router.
  const double bound = 1.0 / std::sqrt(double(d_model));
  cluster_weight =
      register_parameter("cluster_weight", torch::empty({n_cluster_, d_model}).uniform_(-bound, bound));
  expert_weight = register_parameter(
      "expert_weight", torch::empty({n_cluster_, n_per_cluster_, d_model}).uniform_(-bound, bound));
  // Zero start: a(x) = 0.5 for every token until w is learned (the paper's form has no bias).
  if (cfg_.hierarchical.adaptive_weight)
    adaptive_weight = register_parameter("adaptive_weight", torch::zeros({d_model}));
  expert_reliability = register_buffer("expert_reliability", torch::ones({n_expert_}));
  cluster_reliability = register_buffer("cluster_reliability", torch::ones({n_cluster_}));
  expert_active = register_buffer("expert_active", torch::ones({n_expert_}));
  expert_count = register_buffer("expert_count", torch::zeros({n_expert_}, torch::kDouble));
  cluster_count = register_buffer("cluster_count", torch::zeros({n_cluster_}, torch::kDouble));
}

RoutingPlan HierarchicalRouterImpl::route(const torch::Tensor& x, const RouteContext& /*ctx*/) {
  const int64_t T = x.size(0), G = n_cluster_, Eg = n_per_cluster_, Kc = k_cluster_, Ke = k_expert_;
  const auto dev = x.device();
  // Reliability and pruning enter the logits as log(r * active): log r for a degraded expert (section 5),
  // -inf for a pruned one. A cluster is routable while any of its experts is.
  auto expert_bias = (expert_reliability * expert_active).log().to(x.dtype()).view({G, Eg});  // [G, Eg]
  auto cluster_active = expert_active.view({G, Eg}).amax(1);                                  // [G]
  auto cluster_bias = (cluster_reliability * cluster_active).log().to(x.dtype());             // [G]

  // Stage 1: softmax over clusters, top K_c.
  auto zc = torch::matmul(x, cluster_weight.t());  // [T, G] learned logits
  auto pc = torch::softmax(zc + cluster_bias, 1);  // [T, G]
  auto top_c = pc.topk(Kc, 1);
  auto pc_sel = std::get<0>(top_c);  // [T, Kc]
  auto c_sel = std::get<1>(top_c);   // [T, Kc]

  // Stage 2: only the selected clusters' routers run, O(C * K_c * Eg) per token. Pair p = t*Kc + kc.
  auto c_flat = c_sel.reshape({-1}).cpu();  // [T*Kc]
  std::vector<torch::Tensor> pairs_of(G);   // [n_g] pairs that selected cluster g (on dev)
  std::vector<torch::Tensor> idx_parts, logit_parts;
  for (int64_t g = 0; g < G; ++g) {
    auto idx = (c_flat == g).nonzero().squeeze(1);  // [n_g]
    if (idx.numel() == 0) continue;
    auto tok = torch::div(idx, Kc, "floor").to(dev);                                     // [n_g]
    logit_parts.push_back(torch::matmul(x.index_select(0, tok), expert_weight[g].t()));  // [n_g, Eg]
    pairs_of[g] = idx.to(dev);
    idx_parts.push_back(pairs_of[g]);
  }
  auto ze = torch::zeros({T * Kc, Eg}, x.options());  // [T*Kc, Eg] learned logits of each pair's cluster
  if (!idx_parts.empty()) ze = ze.index_copy(0, torch::cat(idx_parts), torch::cat(logit_parts));
  auto pe = torch::softmax(ze + expert_bias.index_select(0, c_sel.reshape({-1})), 1);  // [T*Kc, Eg]
  auto top_e = pe.topk(Ke, 1);
  auto pe_sel = std::get<0>(top_e);  // [T*Kc, Ke]
  auto e_sel = std::get<1>(top_e);   // [T*Kc, Ke] local expert ids

  // Gate = p(cluster) * p(expert | cluster); assignments listed cluster-rank major.
  auto expert_id = (c_sel.reshape({T * Kc, 1}) * Eg + e_sel).reshape({T, Kc * Ke});  // [T, Kc*Ke]
  auto raw_gate = (pc_sel.reshape({T * Kc, 1}) * pe_sel).reshape({T, Kc * Ke}).detach();
  // Renormalisation (when asked) is done per stage, each over its own choices and only when there are
  // two or more: p(expert | cluster) over the K_e chosen inside the cluster, p(cluster) over the K_c
  // chosen clusters. Renormalising the product over all K_c * K_e assignments would cancel p(cluster)
  // whenever K_c = 1 (the default), and the cluster router would get no gradient from the task loss
  // (docs/routing.md, hierarchical).
  auto pc_g = pc_sel, pe_g = pe_sel;
  if (cfg_.renormalize && Kc >= 2) pc_g = pc_g / pc_g.sum(1, true).clamp_min(1e-20);
  if (cfg_.renormalize && Ke >= 2) pe_g = pe_g / pe_g.sum(1, true).clamp_min(1e-20);
  auto gate = (pc_g.reshape({T * Kc, 1}) * pe_g).reshape({T, Kc * Ke});  // [T, Kc*Ke]

  // Capacity, cluster level first: cap_c = ceil(CF_c * T * K_c / G) (token, cluster) pairs per cluster,
  // overflow rules of section 1. A zero probability means a pruned cluster chosen only to fill K_c.
  auto raw_cpu = raw_gate.cpu();
  torch::Tensor priority;  // [T] Switch batch-prioritised order: a token's best assignment
  if (cfg_.overflow == OverflowOrder::kBatchPrioritized) priority = std::get<0>(raw_cpu.max(1));
  auto c_sel_cpu = c_sel.cpu();
  const int64_t cap_c = expert_capacity(cfg_.hierarchical.cluster_capacity_factor, T, Kc, G);
  RoutingPlan cplan =
      build_plan_from_choices(c_sel_cpu, pc_sel.detach().cpu() > 0, priority, pc_sel.detach(), G, cap_c);
  auto kept_tc = torch::zeros({T, G}, torch::kBool);  // [T, G] pairs the cluster level served
  {
    const auto off = cplan.offsets();
    auto tok = cplan.token_index.cpu();
    for (int64_t g = 0; g < G; ++g)
      kept_tc.select(1, g).index_fill_(0, tok.narrow(0, off[g], off[g + 1] - off[g]), true);
  }
  auto keep = kept_tc.gather(1, c_sel_cpu).unsqueeze(2).expand({T, Kc, Ke}).reshape({T, Kc * Ke}) &
              (raw_cpu > 0);  // [T, Kc*Ke]

  // Then the expert level: cap_e = ceil(CF * T * K_c*K_e / E).
  const int64_t cap_e = expert_capacity(cfg_.capacity_factor, T, Kc * Ke, n_expert_);
  RoutingPlan plan = build_plan_from_choices(expert_id.cpu(), keep, priority, gate, n_expert_, cap_e);
  // Requested = every valid assignment, so that drops at the cluster level count as drops too.
  plan.stats = make_routing_stats(plan.stats.load, T, (raw_cpu > 0).sum().item<int64_t>());

  // Aux losses, all over full softmaxes (never over the selected logits only).
  auto loss = torch::zeros({}, x.options());
  if (cfg_.balance_coef > 0) {
    // Switch loss over clusters + the mean over clusters of the Switch loss over their experts, each on
    // the pairs that selected the cluster.
    auto within = torch::zeros({}, x.options());
    int64_t used = 0;
    for (int64_t g = 0; g < G; ++g) {
      if (!pairs_of[g].defined()) continue;
      within =
          within + switch_balance_loss(pe.index_select(0, pairs_of[g]), e_sel.index_select(0, pairs_of[g]));
      ++used;
    }
    if (used > 0) within = within / double(used);
    // The cluster-level loss over the global batch (docs/distributed.md); the within-cluster ones stay each
    // rank's, since a rank may have no pair in a cluster.
    loss = loss + cfg_.balance_coef * (switch_balance_loss_global(pc, c_sel) + within);
  }
  if (cfg_.z_loss_coef > 0) loss = loss + cfg_.z_loss_coef * (router_z_loss(zc) + router_z_loss(ze));
  if (cfg_.hierarchical.diversity_coef > 0 && Eg >= 2)
    loss = loss + cfg_.hierarchical.diversity_coef * diversity_loss();
  plan.aux_loss = loss;

  if (cfg_.hierarchical.adaptive_weight)
    plan.token_scale = torch::sigmoid(torch::matmul(x, adaptive_weight));  // [T]
  // (token, cluster) pairs the cluster level served; the utilisation counters take them in after_step.
  plan.stats.group_load = cplan.stats.load;
  return plan;
}

// The health signal h_e in [0, 1] of an expert that served tokens in the step (all its micro-batches):
//   h = share of its output rows that are finite;
//   h = 0 if its output RMS exceeds reliability_explode x the median RMS of the healthy active experts;
//   h *= min(1, 1.5 * L_mean / L_e) when per-token losses are given: L_e = mean loss of the tokens it served,
//        L_mean = the mean over the step's tokens; skipped in a step where some expert shows one of the two
//        direct signals above (its faults spread to every expert's token losses).
// r <- decay * r + (1 - decay) * h, clamped to [1e-4, 1]. A cluster's h is the load-weighted mean of its
// experts' h. An expert that served no token has no signal: its r moves toward the prior 1 instead,
// r <- rec * r + (1 - rec) with rec = moe.reliability_recovery, so that an expert starved by a low r gets
// traffic back and is measured again (docs/routing.md, hierarchical: without it one starved expert stayed
// starved for good); an idle cluster likewise. rec (0.999) >> decay (0.9): a faulty expert is only probed
// now and then (with recovery 0.99 a NaN expert was probed on 6 of 20 steps, measured in
// tests/test_hierarchical.cpp).
void HierarchicalRouterImpl::after_step(const RouteFeedback& fb) {
  if (fb.empty()) return;
  torch::NoGradGuard ng;
  const int64_t E = n_expert_, G = n_cluster_, Eg = n_per_cluster_;
  {
    auto le = torch::tensor(std::vector<double>(fb.load.begin(), fb.load.end()), torch::kDouble);
    expert_count.add_(le.to(expert_count.device()));
    if (!fb.group_load.empty()) {
      auto lc =
          torch::tensor(std::vector<double>(fb.group_load.begin(), fb.group_load.end()), torch::kDouble);
      cluster_count.add_(lc.to(cluster_count.device()));
    }
  }
  // moe.reliability = 0: no tracking (r stays at its prior 1), the fault experiment's baseline. A MoEConfig
  // built in code has no entry: tracking on.
  if (!fb.has_health || cfg_.hierarchical.reliability == 0) return;
  const auto rms = fb.out_rms();
  const auto& rows = fb.out_rows;
  const auto& bad = fb.nonfinite;

  std::vector<double> healthy_rms;
  for (int64_t e = 0; e < E; ++e)
    if (rows[e] > 0 && bad[e] == 0 && std::isfinite(rms[e])) healthy_rms.push_back(rms[e]);
  double median = 0;
  if (!healthy_rms.empty()) {
    std::nth_element(healthy_rms.begin(), healthy_rms.begin() + healthy_rms.size() / 2, healthy_rms.end());
    median = healthy_rms[healthy_rms.size() / 2];
  }
  // Direct evidence (an expert's own rows non-finite or exploding) outranks the loss signal: a NaN or a huge
  // row spreads through attention to later positions of its sequence, so the losses of tokens that every
  // expert served go bad with it, and the loss term would condemn all experts alike, leaving the faulty one
  // no less likely than the rest (measured in docs/comparison.md's fault experiment). In such a step only
  // the direct signal counts.
  bool direct = false;
  for (int64_t e = 0; e < E; ++e)
    direct =
        direct || (rows[e] > 0 && (bad[e] > 0 || !std::isfinite(rms[e]) ||
                                   (median > 0 && rms[e] > cfg_.hierarchical.reliability_explode * median)));
  const double loss_mean = fb.has_loss && fb.loss_count > 0 && !direct
                               ? fb.loss_sum / double(fb.loss_count)
                               : std::numeric_limits<double>::quiet_NaN();

  std::vector<double> h(E, -1.0);  // -1: no signal this step
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = rows[e];
    if (n == 0) continue;
    double he = 1.0 - double(bad[e]) / double(n);
    if (!std::isfinite(rms[e]) || (median > 0 && rms[e] > cfg_.hierarchical.reliability_explode * median))
      he = 0;
    if (std::isfinite(loss_mean) && loss_mean > 0) {
      if (fb.expert_loss_bad[e] > 0 || fb.expert_loss_count[e] == 0) {
        he = 0;
      } else {
        const double le = fb.expert_loss_sum[e] / double(fb.expert_loss_count[e]);
        if (le > 0) he *= std::min(1.0, kLossTolerance * loss_mean / le);
      }
    }
    h[e] = he;
  }

  const double d = cfg_.hierarchical.reliability_decay, rec = cfg_.hierarchical.reliability_recovery;
  auto r_e = expert_reliability.to(torch::kCPU, torch::kDouble).contiguous();
  auto r_c = cluster_reliability.to(torch::kCPU, torch::kDouble).contiguous();
  double* re = r_e.data_ptr<double>();
  double* rc = r_c.data_ptr<double>();
  for (int64_t e = 0; e < E; ++e)
    re[e] =
        std::clamp(h[e] >= 0 ? d * re[e] + (1 - d) * h[e] : rec * re[e] + (1 - rec), kMinReliability, 1.0);
  for (int64_t g = 0; g < G; ++g) {
    double num = 0, den = 0;
    for (int64_t e = g * Eg; e < (g + 1) * Eg; ++e) {
      if (h[e] < 0) continue;
      const double w = double(rows[e]);
      num += w * h[e];
      den += w;
    }
    rc[g] =
        std::clamp(den > 0 ? d * rc[g] + (1 - d) * num / den : rec * rc[g] + (1 - rec), kMinReliability, 1.0);
  }
  expert_reliability.copy_(r_e.to(expert_reliability.scalar_type()));
  cluster_reliability.copy_(r_c.to(cluster_reliability.scalar_type()));
}

torch::Tensor HierarchicalRouterImpl::assignment_scores(const torch::Tensor& x, const RoutingPlan& /*plan*/) {
  // p(cluster) * p(expert | cluster) over all E experts (every cluster, not only the K_c selected ones, so
  // the optimum may pick clusters the router did not), with reliability and pruning as route() has them.
  torch::NoGradGuard ng;
  const int64_t T = x.size(0), G = n_cluster_, Eg = n_per_cluster_;
  auto expert_bias = (expert_reliability * expert_active).log().to(x.dtype()).view({G, Eg});
  auto cluster_bias = (cluster_reliability * expert_active.view({G, Eg}).amax(1)).log().to(x.dtype());
  auto pc = torch::softmax(torch::matmul(x, cluster_weight.t()) + cluster_bias, 1);  // [T, G]
  auto ze = torch::einsum("tc,gec->tge", {x, expert_weight}) + expert_bias;          // [T, G, Eg]
  return (pc.unsqueeze(2) * torch::softmax(ze, 2)).reshape({T, n_expert_});          // [T, E]
}

nlohmann::json HierarchicalRouterImpl::describe_state() const {
  auto j = Router::describe_state();
  j["summary"] = summary().to_json();
  return j;
}

nlohmann::json HierarchicalRouterImpl::trace_fields(const RoutingPlan& plan, int64_t token,
                                                    const std::vector<int64_t>& experts) const {
  // The clusters the token's experts belong to (the K_c the cluster router picked that kept an expert), the
  // reliabilities that biased both stages, and the adaptive output weight a(x) when on (docs/serve.md).
  auto rc = cluster_reliability.to(torch::kCPU, torch::kDouble).contiguous();
  auto re = expert_reliability.to(torch::kCPU, torch::kDouble).contiguous();
  std::vector<int64_t> clusters;
  std::vector<double> cluster_rel, expert_rel;
  for (int64_t e : experts) {
    const int64_t g = e / n_per_cluster_;
    if (g >= n_cluster_) continue;
    if (clusters.empty() || clusters.back() != g) {  // experts ascend, so a cluster's are adjacent
      clusters.push_back(g);
      cluster_rel.push_back(rc.data_ptr<double>()[g]);
    }
    expert_rel.push_back(re.data_ptr<double>()[e]);
  }
  nlohmann::json j = {
      {"clusters", clusters}, {"cluster_reliability", cluster_rel}, {"expert_reliability", expert_rel}};
  if (plan.token_scale.defined()) j["scale"] = plan.token_scale[token].item<double>();
  return j;
}

torch::Tensor HierarchicalRouterImpl::diversity_loss() const {
  const int64_t Eg = n_per_cluster_;
  if (Eg < 2) return torch::zeros({}, expert_weight.options());
  auto w = expert_weight / expert_weight.norm(2, {2}, true).clamp_min(1e-12);  // [G, Eg, C] unit rows
  auto cos = torch::matmul(w, w.transpose(1, 2));                              // [G, Eg, Eg]
  auto off_diag = cos.sum({1, 2}) - cos.diagonal(0, 1, 2).sum(1);              // [G]
  return (off_diag / double(Eg * (Eg - 1))).mean();
}

void HierarchicalRouterImpl::set_pruned(const std::vector<int64_t>& experts) {
  torch::NoGradGuard ng;
  auto active = torch::ones({n_expert_});
  for (int64_t e : experts) {
    TORCH_CHECK(e >= 0 && e < n_expert_, "set_pruned: expert ", e, " out of range [0, ", n_expert_, ")");
    active[e] = 0;
  }
  TORCH_CHECK(active.sum().item<double>() >= 1, "set_pruned: cannot prune every expert");
  expert_active.copy_(active);
}

void HierarchicalRouterImpl::set_expert_mask(const torch::Tensor& active) {
  auto a = active.to(torch::kCPU, torch::kFloat).reshape({-1});
  if (a.numel() != n_expert_)
    throw std::invalid_argument("hierarchical: expert mask has " + std::to_string(a.numel()) +
                                " entries for " + std::to_string(n_expert_) + " experts");
  std::vector<int64_t> off;
  for (int64_t e = 0; e < n_expert_; ++e)
    if (a[e].item<float>() == 0) off.push_back(e);
  if (int64_t(off.size()) == n_expert_)
    throw std::invalid_argument("hierarchical: cannot prune every expert");
  set_pruned(off);
}

std::vector<int64_t> HierarchicalRouterImpl::pruned() const {
  auto a = expert_active.cpu();
  std::vector<int64_t> out;
  for (int64_t e = 0; e < n_expert_; ++e)
    if (a[e].item<double>() == 0) out.push_back(e);
  return out;
}

void HierarchicalRouterImpl::reset_counters() {
  torch::NoGradGuard ng;
  expert_count.zero_();
  cluster_count.zero_();
}

HierarchicalSummary HierarchicalRouterImpl::summary() const {
  auto ec = expert_count.to(torch::kCPU, torch::kDouble).contiguous();
  auto cc = cluster_count.to(torch::kCPU, torch::kDouble).contiguous();
  auto er = expert_reliability.to(torch::kCPU, torch::kDouble).contiguous();
  auto cr = cluster_reliability.to(torch::kCPU, torch::kDouble).contiguous();
  auto ea = expert_active.to(torch::kCPU, torch::kDouble).contiguous();
  const double e_total = ec.sum().item<double>(), c_total = cc.sum().item<double>();
  HierarchicalSummary s;
  std::vector<double> e_load, c_load;
  for (int64_t g = 0; g < n_cluster_; ++g) {
    ClusterSummary c;
    c.id = g;
    c.load = cc.data_ptr<double>()[g];
    c.share = c_total > 0 ? c.load / c_total : 0;
    c.reliability = cr.data_ptr<double>()[g];
    c_load.push_back(c.load);
    for (int64_t e = g * n_per_cluster_; e < (g + 1) * n_per_cluster_; ++e) {
      ExpertSummary x;
      x.id = e;
      x.load = ec.data_ptr<double>()[e];
      x.share = e_total > 0 ? x.load / e_total : 0;
      x.reliability = er.data_ptr<double>()[e];
      x.pruned = ea.data_ptr<double>()[e] == 0;
      e_load.push_back(x.load);
      c.experts.push_back(x);
    }
    s.clusters.push_back(std::move(c));
  }
  s.max_vio_expert = max_violation(e_load);
  s.max_vio_cluster = max_violation(c_load);
  return s;
}

nlohmann::json HierarchicalSummary::to_json() const {
  nlohmann::json j;
  j["max_vio_expert"] = max_vio_expert;
  j["max_vio_cluster"] = max_vio_cluster;
  j["clusters"] = nlohmann::json::array();
  for (const auto& c : clusters) {
    nlohmann::json jc{{"id", c.id}, {"load", c.load}, {"share", c.share}, {"reliability", c.reliability}};
    jc["experts"] = nlohmann::json::array();
    for (const auto& e : c.experts)
      jc["experts"].push_back({{"id", e.id},
                               {"load", e.load},
                               {"share", e.share},
                               {"reliability", e.reliability},
                               {"pruned", e.pruned}});
    j["clusters"].push_back(jc);
  }
  return j;
}

RouterSpec hierarchical_router_spec() {
  using option_checks::str;
  RouterSpec r;
  r.name = "hierarchical";
  r.summary = "cluster-then-expert routing with reliability tracking (ClusterMoE; section 5)";
  r.make = [](const MoEConfig& cfg, int64_t d_model) {
    return std::make_shared<HierarchicalRouterImpl>(cfg, d_model);
  };
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    auto& o = c->hierarchical;
    b.bind("moe.n_cluster_used", &o.n_cluster_used);
    b.bind("moe.cluster_capacity_factor", &o.cluster_capacity_factor);
    b.bind("moe.reliability_decay", &o.reliability_decay);
    b.bind("moe.reliability_explode", &o.reliability_explode);
    b.bind("moe.reliability_recovery", &o.reliability_recovery);
    b.bind("moe.reliability", &o.reliability);
    b.bind("moe.diversity_coef", &o.diversity_coef);
    b.bind("moe.adaptive_weight", &o.adaptive_weight);
  };
  r.validate = [](const MoEConfig& c) {
    const auto& o = c.hierarchical;
    option_checks::clusters(c);
    const int64_t E = c.routed_experts(), K = c.routed_used(), G = c.n_cluster;
    if (E % G != 0)
      throw ConfigError("moe.n_cluster",
                        "the " + str(E) + " routed experts do not split into " + str(G) + " equal clusters");
    if (o.n_cluster_used < 1 || o.n_cluster_used > G)
      throw ConfigError("moe.n_cluster_used",
                        "must be in [1, moe.n_cluster = " + str(G) + "], got " + str(o.n_cluster_used));
    if (K > E / G)
      throw ConfigError("moe.n_expert_used",
                        "K_e = " + str(K) + " exceeds the " + str(E / G) + " experts of one cluster");
    if (!std::isfinite(o.cluster_capacity_factor) || o.cluster_capacity_factor < 0)
      throw ConfigError("moe.cluster_capacity_factor",
                        "must be >= 0 (0 = none), got " + std::to_string(o.cluster_capacity_factor));
    option_checks::unit_decay("moe.reliability_decay", o.reliability_decay);
    option_checks::unit_decay("moe.reliability_recovery", o.reliability_recovery);
    if (o.reliability != 0 && o.reliability != 1)
      throw ConfigError("moe.reliability",
                        "must be 1 (track reliability) or 0 (off), got " + std::to_string(o.reliability));
    if (!(o.reliability_explode > 1) || !std::isfinite(o.reliability_explode))
      throw ConfigError("moe.reliability_explode",
                        "must be a finite number > 1, got " + std::to_string(o.reliability_explode));
    option_checks::nonneg("moe.diversity_coef", o.diversity_coef);
  };
  r.equal_compute = [](MoEConfig& m) {
    // K_c clusters x K_e experts in each: the fewest clusters that fit, so the choice inside a cluster stays
    // as wide as possible.
    const int64_t K = m.n_expert_used, G = m.n_cluster, Eg = m.routed_experts() / std::max<int64_t>(G, 1);
    int64_t kc = 0;
    for (int64_t c = 1; c <= std::min(K, G) && kc == 0; ++c)
      if (K % c == 0 && K / c <= Eg) kc = c;
    if (kc == 0)
      throw ConfigError("moe.n_expert_used", "K = " + str(K) + " cannot be split as K_c * K_e with K_c <= " +
                                                 str(G) + " clusters and K_e <= " + str(Eg) +
                                                 " experts per cluster (hierarchical at equal compute)");
    m.hierarchical.n_cluster_used = kc;
    m.n_expert_used = K / kc;
    return "K_c " + str(kc) + " x K_e " + str(K / kc);
  };
  return r;
}

}  // namespace moeforge
