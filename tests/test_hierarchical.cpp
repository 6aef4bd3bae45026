// Hierarchical cluster routing (ClusterMoE, docs/routing.md section 5): gates, two-level capacity,
// reliability under fault injection, diversity-loss gradient, pruning, adaptive weight, state round trip,
// config errors.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

#include "moeforge/experiments/prune.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/routing/hierarchical.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

MoEConfig hier_config() {
  MoEConfig c;
  c.router = "hierarchical";
  c.n_expert = 8;
  c.n_cluster = 2;
  c.hierarchical.n_cluster_used = 1;
  c.n_expert_used = 2;  // K_e
  c.d_expert = 32;
  return c;
}

std::shared_ptr<HierarchicalRouterImpl> as_hier(const MoELayer& layer) {
  auto r = std::dynamic_pointer_cast<HierarchicalRouterImpl>(layer->router);
  EXPECT_TRUE(r != nullptr);
  return r;
}

// (token, expert) -> gate of a plan.
std::map<std::pair<int64_t, int64_t>, double> gates_of(const RoutingPlan& plan) {
  std::map<std::pair<int64_t, int64_t>, double> m;
  const auto off = plan.offsets();
  auto tok = plan.token_index.cpu();
  auto g = plan.gate.detach().cpu().to(torch::kDouble);
  for (int64_t e = 0; e + 1 < int64_t(off.size()); ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) m[{tok[i].item<int64_t>(), e}] = g[i].item<double>();
  return m;
}

TEST(Hierarchical, GateIsClusterProbTimesExpertProb) {
  torch::manual_seed(1);
  auto cfg = hier_config();
  cfg.renormalize = false;
  HierarchicalRouter router(cfg, 6);
  router->to(torch::kDouble);
  auto x = torch::randn({7, 6}, torch::kDouble);
  auto plan = router->route(x, {});
  auto got = gates_of(plan);
  ASSERT_EQ(int64_t(got.size()), 7 * 2);  // K_c * K_e = 2 assignments per token, dropless

  // Hand computation, one token at a time, in plain loops.
  auto Wc = router->cluster_weight.detach(), We = router->expert_weight.detach();
  for (int64_t t = 0; t < 7; ++t) {
    auto pc = torch::softmax(torch::mv(Wc, x[t]), 0);  // [G]
    const int64_t c = pc.argmax().item<int64_t>();
    auto pe = torch::softmax(torch::mv(We[c], x[t]), 0);  // [Eg]
    auto top = pe.topk(2);
    for (int64_t k = 0; k < 2; ++k) {
      const int64_t j = std::get<1>(top)[k].item<int64_t>();
      const double want = pc[c].item<double>() * std::get<0>(top)[k].item<double>();
      auto it = got.find({t, c * 4 + j});
      ASSERT_TRUE(it != got.end()) << "token " << t << " not routed to expert " << c * 4 + j;
      EXPECT_NEAR(it->second, want, 1e-12) << "token " << t;  // float64 throughout: rounding only
    }
  }
}

TEST(Hierarchical, RenormalisedGatesSumToOnePerToken) {
  torch::manual_seed(2);
  auto cfg = hier_config();
  cfg.hierarchical.n_cluster_used = 2;
  HierarchicalRouter router(cfg, 6);
  auto x = torch::randn({9, 6});
  auto plan = router->route(x, {});
  auto sums = torch::zeros({9}).index_add(0, plan.token_index, plan.gate.detach());
  EXPECT_TENSOR_NEAR(sums, torch::ones({9}), 1e-6, 0);  // float32 sum of 4 terms
  EXPECT_EQ(plan.n_assign(), 9 * 4);
}

// All 16 tokens prefer cluster 0. Cluster cap = ceil(0.5 * 16 * 1 / 2) = 4 binds first; then an expert cap
// of ceil(0.5 * 16 * 1 / 4) = 2 binds inside the cluster.
TEST(Hierarchical, CapacityIsHonouredAtBothLevels) {
  torch::manual_seed(3);
  auto cfg = hier_config();
  cfg.n_expert = 4;
  cfg.n_expert_used = 1;
  auto x = torch::rand({16, 4}) + 0.1;  // positive entries
  auto make = [&](double cf_cluster, double cf_expert) {
    auto c = cfg;
    c.hierarchical.cluster_capacity_factor = cf_cluster;
    c.capacity_factor = cf_expert;
    HierarchicalRouter r(c, 4);
    torch::NoGradGuard ng;
    r->cluster_weight[0].fill_(1.0);
    r->cluster_weight[1].fill_(-1.0);
    return r->route(x, {});
  };
  auto only_cluster = make(0.5, 0.0);
  EXPECT_EQ(only_cluster.stats.load[0] + only_cluster.stats.load[1], 4);  // cluster 0 served 4 tokens
  EXPECT_EQ(only_cluster.stats.load[2] + only_cluster.stats.load[3], 0);
  EXPECT_DOUBLE_EQ(only_cluster.stats.dropped_share, 12.0 / 16.0);
  // First 4 tokens in token order got the cluster.
  EXPECT_EQ(std::get<0>(only_cluster.token_index.sort()).slice(0, 0, 4).max().item<int64_t>(), 3);

  auto only_expert = make(0.0, 0.5);
  for (int64_t e = 0; e < 4; ++e) EXPECT_LE(only_expert.stats.load[e], 2) << "expert " << e;

  auto both = make(0.5, 0.5);
  EXPECT_LE(both.stats.load[0] + both.stats.load[1], 4);
  for (int64_t e = 0; e < 4; ++e) EXPECT_LE(both.stats.load[e], 2) << "expert " << e;
}

// Drives a layer through forward + after_step with the per-token "loss" ||y_t||^2 / C (a stand-in for the
// training loss of a layer whose target is 0) and returns, per step, the load of `faulty` and the loss.
std::vector<int64_t> drive(MoELayer& layer, const torch::Tensor& x, int64_t faulty, int64_t steps,
                           std::vector<double>* losses) {
  std::vector<int64_t> load;
  layer->train();
  for (int64_t s = 0; s < steps; ++s) {
    torch::NoGradGuard ng;
    auto out = layer->forward(x);
    load.push_back(out.plan.stats.load[faulty]);
    auto token_loss = out.y.pow(2).mean(1);  // [T]
    losses->push_back(token_loss.mean().item<double>());
    layer->add_token_loss(token_loss);
    layer->after_step();
  }
  return load;
}

// The number of steps with reliability decay 0.9 after which the faulty expert first serves no token, on
// this seeded setup (measured 17 for the exploding case, 28 for the NaN case; the bound leaves room for
// other LibTorch versions' random streams).
constexpr int64_t kStepsToSilence = 40;

// After it first falls silent, an idle faulty expert's r moves back toward 1 (moe.reliability_recovery,
// docs/routing.md), so it is probed again now and then and falls silent again: its traffic stays a small
// share of what it served before the fault.
double mean_load_from(const std::vector<int64_t>& load, int64_t from) {
  double s = 0;
  for (int64_t i = from; i < int64_t(load.size()); ++i) s += double(load[i]);
  return s / double(std::max<int64_t>(1, int64_t(load.size()) - from));
}

TEST(Hierarchical, ExplodingExpertLosesReliabilityAndTraffic) {
  torch::manual_seed(4);
  auto cfg = hier_config();
  MoELayer layer(cfg, 16);
  auto x = torch::randn({256, 16});
  double healthy_loss = 0;
  {
    torch::NoGradGuard ng;
    healthy_loss = layer->forward(x).y.pow(2).mean().item<double>();
    layer->experts->w_down[3].mul_(1e4);  // fault injection: outputs 1e4 x too large
  }
  std::vector<double> losses;
  auto load = drive(layer, x, 3, 80, &losses);
  ASSERT_GT(load[0], 0) << "the faulty expert must serve tokens before it is detected";
  int64_t silent_at = -1;
  for (int64_t s = 0; s < int64_t(load.size()); ++s)
    if (load[s] == 0 && silent_at < 0) silent_at = s;
  const double after = mean_load_from(load, silent_at);
  std::printf("exploding expert: load %lld at step 0, 0 first at step %lld, mean %.2f after\n",
              (long long)load[0], (long long)silent_at, after);
  ASSERT_GE(silent_at, 0);
  EXPECT_LE(silent_at, kStepsToSilence);
  EXPECT_LE(after, 0.1 * double(load[0]));
  auto r = as_hier(layer);
  EXPECT_LT(r->expert_reliability[3].item<double>(), 0.5);
  // Healthy experts keep most of their reliability (the loss tolerance of 1.5x the mean protects them).
  for (int64_t e = 0; e < 8; ++e)
    if (e != 3) {
      EXPECT_GT(r->expert_reliability[e].item<double>(), 0.5) << "expert " << e;
    }
  // The layer's loss recovers: the median of the last 20 steps within 2x the loss before the fault (the
  // traffic moved to other experts, which give different but healthy outputs; the faulty one was ~1e8 x
  // on the steps it is probed).
  std::vector<double> tail(losses.end() - 20, losses.end());
  std::nth_element(tail.begin(), tail.begin() + 10, tail.end());
  std::printf("loss healthy %.4g, median of the last 20 steps %.4g\n", healthy_loss, tail[10]);
  EXPECT_LT(tail[10], 2 * healthy_loss);
}

TEST(Hierarchical, NonFiniteExpertLosesTraffic) {
  torch::manual_seed(5);
  auto cfg = hier_config();
  MoELayer layer(cfg, 16);
  auto x = torch::randn({256, 16});
  {
    torch::NoGradGuard ng;
    layer->experts->w_down[5].fill_(std::nan(""));
  }
  std::vector<double> losses;
  auto load = drive(layer, x, 5, 80, &losses);
  ASSERT_GT(load[0], 0);
  int64_t silent_at = -1;
  for (int64_t s = 0; s < int64_t(load.size()); ++s)
    if (load[s] == 0 && silent_at < 0) silent_at = s;
  std::printf("NaN expert: load %lld at step 0, 0 first at step %lld\n", (long long)load[0],
              (long long)silent_at);
  ASSERT_GE(silent_at, 0);
  EXPECT_LE(silent_at, kStepsToSilence);
  EXPECT_LE(mean_load_from(load, silent_at), 0.1 * double(load[0]));
  int finite = 0;
  for (size_t i = losses.size() - 20; i < losses.size(); ++i) finite += std::isfinite(losses[i]);
  EXPECT_GE(finite, 16) << "outputs must be finite on most steps once the expert is avoided";
}

// In a model a NaN row spreads through attention to the later positions of its sequence, so the token
// losses of every expert's tokens go NaN with it. The faulty expert's own non-finite rows must still single
// it out: before the direct signal outranked the loss signal, every expert that served a token got h = 0
// and all reliabilities fell alike (0.9^10 = 0.35 each), leaving the faulty expert as likely as any.
TEST(Hierarchical, NaNExpertIsSingledOutWhenItsNaNsReachEveryTokenLoss) {
  torch::manual_seed(5);
  MoELayer layer(hier_config(), 16);
  auto x = torch::randn({256, 16});
  layer->set_fault(5, std::nan(""));
  layer->train();
  std::vector<int64_t> served(8, 0);
  for (int s = 0; s < 10; ++s) {
    torch::NoGradGuard ng;
    auto out = layer->forward(x);
    for (int64_t e = 0; e < 8; ++e) served[e] += out.plan.stats.load[e];
    // The first quarter of the positions before the fault's first NaN, finite; every later one NaN.
    auto loss = torch::full({256}, std::nan(""));
    loss.narrow(0, 0, 64).fill_(1.0);
    layer->add_token_loss(loss);
    layer->after_step();
  }
  auto r = as_hier(layer);
  ASSERT_GT(served[5], 0);
  EXPECT_LT(r->expert_reliability[5].item<double>(), 0.5);
  for (int64_t e = 0; e < 8; ++e) {
    if (e != 5 && served[e] > 0) {
      EXPECT_GT(r->expert_reliability[e].item<double>(), 0.99) << "expert " << e;
    }
  }
}

TEST(Hierarchical, DiversityLossGradientMatchesFiniteDifferences) {
  torch::manual_seed(6);
  HierarchicalRouter router(hier_config(), 5);
  router->to(torch::kDouble);
  auto loss = router->diversity_loss();
  loss.backward();
  auto analytic = router->expert_weight.grad().clone();
  auto numeric = test::numeric_grad([&] { return router->diversity_loss(); }, router->expert_weight.detach());
  // Central differences in float64 with eps 1e-6: truncation ~1e-12, rounding ~1e-10.
  EXPECT_TENSOR_NEAR(analytic, numeric, 1e-7, 1e-6);
  EXPECT_GT(analytic.abs().max().item<double>(), 1e-3) << "the gradient must not vanish";
}

TEST(Hierarchical, ForwardBackwardThroughLayerReachesBothRouterStages) {
  torch::manual_seed(7);
  auto cfg = hier_config();
  cfg.hierarchical.adaptive_weight = true;
  MoELayer layer(cfg, 16);
  layer->train();
  auto x = torch::randn({2, 32, 16}, torch::requires_grad());
  auto out = layer->forward(x);
  (out.y.pow(2).mean() + out.plan.aux_loss).backward();
  auto r = as_hier(layer);
  EXPECT_GT(r->cluster_weight.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(r->expert_weight.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(r->adaptive_weight.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(x.grad().abs().sum().item<double>(), 0);
  // Balance losses alone carry gradient to both stages (full softmaxes, not selected logits).
  r->zero_grad();
  auto cfg2 = hier_config();
  cfg2.z_loss_coef = 0;
  cfg2.hierarchical.diversity_coef = 0;
  HierarchicalRouter only_balance(cfg2, 16);
  only_balance->route(torch::randn({64, 16}), {}).aux_loss.backward();
  EXPECT_GT(only_balance->cluster_weight.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(only_balance->expert_weight.grad().abs().sum().item<double>(), 0);
}

TEST(Hierarchical, AdaptiveWeightScalesTheRoutedOutput) {
  torch::manual_seed(8);
  auto cfg = hier_config();
  cfg.hierarchical.adaptive_weight = true;
  MoELayer layer(cfg, 16);
  auto r = as_hier(layer);
  {
    torch::NoGradGuard ng;
    r->adaptive_weight.normal_();
  }
  auto x = torch::randn({20, 16});
  torch::NoGradGuard ng;
  auto out = layer->forward(x);
  auto a = torch::sigmoid(torch::mv(x, r->adaptive_weight));  // [T]
  auto unscaled = moe_plain_loop(x, out.plan, layer->experts->weights());
  EXPECT_TENSOR_NEAR(out.y, unscaled * a.unsqueeze(1), 1e-5, 1e-5);  // float32 GEMM order differences
}

TEST(Hierarchical, PruningMasksLowLoadExpertsAndSummaryReportsThem) {
  torch::manual_seed(9);
  MoELayer layer(hier_config(), 16);
  auto r = as_hier(layer);
  auto x = torch::randn({512, 16});
  {
    // The summary's counters are training utilisation: they move in after_step, never in evaluation.
    torch::NoGradGuard ng;
    layer->train();
    layer->forward(x);
    layer->after_step();
  }
  auto s = r->summary();
  std::vector<double> load;
  for (const auto& c : s.clusters)
    for (const auto& e : c.experts) load.push_back(e.load);
  // Hand-made loads: experts 1 and 6 under 5%.
  auto low = experts_below_load_share({10, 0.4, 10, 10, 10, 10, 0.1, 10}, 0.05);
  EXPECT_EQ(low, (std::vector<int64_t>{1, 6}));
  // Prune the two least-used experts of the measured loads.
  std::vector<int64_t> order(8);
  for (int64_t e = 0; e < 8; ++e) order[e] = e;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return load[a] < load[b]; });
  std::vector<int64_t> prune{std::min(order[0], order[1]), std::max(order[0], order[1])};
  r->set_pruned(prune);
  EXPECT_EQ(r->pruned(), prune);
  torch::NoGradGuard ng;
  auto plan = layer->forward(x).plan;
  layer->after_step();
  for (int64_t e : prune) EXPECT_EQ(plan.stats.load[e], 0) << "pruned expert " << e;
  auto j = r->summary().to_json();
  EXPECT_EQ(j["clusters"].size(), 2u);
  const auto& jc = j.at("clusters");
  EXPECT_EQ(jc.at(size_t(prune[0] / 4)).at("experts").at(size_t(prune[0] % 4)).at("pruned").get<bool>(),
            true);
  // Shares of the accumulated loads: a sum of two doubles.
  EXPECT_NEAR(jc.at(size_t(0)).at("share").get<double>() + jc.at(size_t(1)).at("share").get<double>(), 1.0,
              1e-12);
}

TEST(Hierarchical, StateRoundTripGivesSameOutputs) {
  torch::manual_seed(10);
  auto cfg = hier_config();
  MoELayer a(cfg, 16);
  auto x = torch::randn({128, 16});
  {
    torch::NoGradGuard ng;
    a->experts->w_down[2].mul_(1e4);  // make the reliabilities move away from 1
  }
  std::vector<double> unused;
  drive(a, x, 2, 5, &unused);
  MoELayer b(cfg, 16);  // different random init
  {
    torch::NoGradGuard ng;
    auto pb = b->named_parameters(), bb = b->named_buffers();
    for (const auto& p : a->named_parameters()) pb[p.key()].copy_(p.value());
    for (const auto& p : a->named_buffers()) bb[p.key()].copy_(p.value());
  }
  EXPECT_LT(as_hier(b)->expert_reliability[2].item<double>(), 1.0);
  a->eval();
  b->eval();
  torch::NoGradGuard ng;
  auto xa = torch::randn({64, 16});
  EXPECT_TENSOR_NEAR(b->forward(xa).y, a->forward(xa).y, 0, 0);  // same weights, same ops: bit-identical
}

TEST(Hierarchical, BadConfigNamesTheField) {
  auto expect_field = [](MoEConfig c, const std::string& field) {
    test::expect_config_error([&] { c.validate(); }, field);  // validated where a config is read
  };
  auto c = hier_config();
  c.n_cluster = 3;  // 8 experts do not split into 3
  expect_field(c, "moe.n_cluster");
  c = hier_config();
  c.hierarchical.n_cluster_used = 3;
  expect_field(c, "moe.n_cluster_used");
  c = hier_config();
  c.n_expert_used = 5;  // > 4 experts per cluster
  expect_field(c, "moe.n_expert_used");
  c = hier_config();
  c.hierarchical.reliability_decay = 1.0;
  expect_field(c, "moe.reliability_decay");
  c = hier_config();
  c.hierarchical.cluster_capacity_factor = -1;
  expect_field(c, "moe.cluster_capacity_factor");
  c = hier_config();
  c.hierarchical.diversity_coef = -1;
  expect_field(c, "moe.diversity_coef");
}

}  // namespace
}  // namespace moeforge
