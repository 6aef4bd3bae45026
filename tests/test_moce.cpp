// MoCE dual-stage routing (docs/routing.md section 6) and the spherical k-means behind its offline
// clustering.
#include <cmath>
#include <cstdio>
#include <map>

#include "moeforge/data/kmeans.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/routing/moce.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

MoEConfig moce_config() {
  MoEConfig c;
  c.router = "moce";
  c.n_expert = 8;
  c.n_cluster = 4;  // groups of 2
  c.n_expert_used = 1;
  c.d_expert = 16;
  return c;
}

std::shared_ptr<MoCERouterImpl> as_moce(const MoELayer& layer) {
  auto r = std::dynamic_pointer_cast<MoCERouterImpl>(layer->router);
  EXPECT_TRUE(r != nullptr);
  return r;
}

// Orthonormal directions [G, D] (QR of a seeded Gaussian).
torch::Tensor directions(int64_t G, int64_t D) {
  auto q = std::get<0>(torch::linalg_qr(torch::randn({D, G})));  // [D, G]
  return q.t().contiguous();
}

// B sequences of S tokens; sequence b is drawn around direction dir[label[b]] (scale 3, noise 0.3).
torch::Tensor sequences_around(const torch::Tensor& dir, const torch::Tensor& label, int64_t S) {
  const int64_t B = label.size(0), D = dir.size(1);
  auto centre = dir.index_select(0, label) * 3.0;                                // [B, D]
  return centre.unsqueeze(1).expand({B, S, D}) + 0.3 * torch::randn({B, S, D});  // [B, S, D]
}

TEST(KMeans, RecoversWellSeparatedClustersWithPurityOne) {
  torch::manual_seed(11);
  const int64_t G = 4, D = 12, per = 40;
  auto dir = directions(G, D);
  auto label = torch::arange(G).repeat_interleave(per);                              // [M]
  auto scale = torch::rand({G * per, 1}) * 5 + 0.5;                                  // cosine ignores it
  auto x = (dir.index_select(0, label) + 0.1 * torch::randn({G * per, D})) * scale;  // [M, D]
  auto res = spherical_kmeans(x, G, {});
  // Purity: every found cluster holds one true label only, and every label maps to one cluster.
  std::map<int64_t, std::map<int64_t, int64_t>> counts;
  for (int64_t i = 0; i < G * per; ++i) ++counts[res.assignment[i].item<int64_t>()][label[i].item<int64_t>()];
  int64_t majority = 0;
  for (auto& c : counts) {
    int64_t best = 0;
    for (auto& l : c.second) best = std::max(best, l.second);
    majority += best;
  }
  EXPECT_EQ(counts.size(), size_t(G));
  EXPECT_DOUBLE_EQ(double(majority) / double(G * per), 1.0);
  // Centroids are unit vectors; new points go to the centroid of their label's cluster.
  EXPECT_TENSOR_NEAR(res.centroids.norm(2, {1}), torch::ones({G}), 1e-5, 0);  // float32 normalisation
  auto fresh = dir + 0.1 * torch::randn({G, D});
  auto near = nearest_centroid(fresh, res.centroids);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t want = res.assignment[g * per].item<int64_t>();
    EXPECT_EQ(near[g].item<int64_t>(), want) << "label " << g;
  }
  EXPECT_GT(res.mean_similarity, 0.9);  // noise 0.1 per coordinate in 12 dims: cos ~ 0.94
}

TEST(KMeans, IsDeterministicForASeed) {
  torch::manual_seed(12);
  auto x = torch::randn({60, 5});
  auto a = spherical_kmeans(x, 3, {25, 3, 7}), b = spherical_kmeans(x, 3, {25, 3, 7});
  EXPECT_TRUE(a.assignment.equal(b.assignment));
  EXPECT_TRUE(a.centroids.equal(b.centroids));
}

TEST(MoCE, TokensAreOnlyRoutedInsideTheirSequenceGroup) {
  torch::manual_seed(13);
  auto cfg = moce_config();
  cfg.n_expert = 10;
  cfg.moce.n_general = 2;  // experts 8, 9 are general
  cfg.n_expert_used = 2;
  MoELayer layer(cfg, 8);
  const int64_t B = 6, S = 10;
  auto x = torch::randn({B, S, 8});
  RouteContext ctx;
  const auto given = torch::tensor({3, 0, 1, 3, 2, 0}, torch::kLong);
  ctx.cache = test::moce_given_seq_clusters(given);
  auto out = layer->forward(x, ctx);
  EXPECT_TRUE(test::moce_seq_clusters(out.plan).equal(given));
  const auto off = out.plan.offsets();
  auto tok = out.plan.token_index.cpu();
  std::vector<int64_t> group_hits(B * S, 0), general_hits(B * S, 0);
  for (int64_t e = 0; e < 10; ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      const int64_t t = tok[i].item<int64_t>();
      if (e >= 8) {
        ++general_hits[t];
        continue;
      }
      EXPECT_EQ(e / 2, given[t / S].item<int64_t>()) << "token " << t << " left its group";
      ++group_hits[t];
    }
  for (int64_t t = 0; t < B * S; ++t) {
    EXPECT_EQ(group_hits[t], 2) << "token " << t;    // K = 2 = the whole group of 2
    EXPECT_EQ(general_hits[t], 1) << "token " << t;  // one general expert
  }
}

TEST(MoCE, UnseenSequencesGetTheirNearestCentroid) {
  torch::manual_seed(14);
  const int64_t G = 4, C = 8, B = 12, S = 6;
  MoCERouter router(moce_config(), C);
  auto dir = directions(G, C);
  {
    torch::NoGradGuard ng;
    router->centroids.copy_(dir);
    router->centroid_count.fill_(1);
  }
  auto label = torch::randint(G, {B}, torch::kLong);
  auto x = sequences_around(dir, label, S);
  RouteContext ctx;
  ctx.n_seq = B;
  ctx.seq_len = S;
  auto plan = router->route(x.reshape({B * S, C}), ctx);  // evaluation: no ids given
  EXPECT_TRUE(test::moce_seq_clusters(plan).equal(label)) << test::moce_seq_clusters(plan) << " vs " << label;
  EXPECT_TRUE(test::moce_seq_clusters(plan).equal(nearest_centroid(x.mean(1), dir)));
  EXPECT_TRUE(router->centroids.equal(dir)) << "evaluation must not move centroids";
}

// The prompt pool (moe.moce_pool = "prompt", instruction data): a sample's cluster is a function of its
// prompt only. Two batches whose prompts agree and whose responses differ get the same clusters at every
// position; the response positions all take the prompt's cluster; inside the prompt it is the running
// prefix pool; and token-by-token generation with the cache's running sum gives the same clusters.
TEST(MoCE, PromptPoolClusterDependsOnlyOnThePrompt) {
  torch::manual_seed(21);
  const int64_t G = 4, C = 8, B = 6, S = 10;
  auto cfg = moce_config();
  cfg.moce.pool = MocePool::kPrompt;
  MoCERouter router(cfg, C);
  auto dir = directions(G, C);
  {
    torch::NoGradGuard ng;
    router->centroids.copy_(dir);
    router->centroid_count.fill_(1);
  }
  auto label = torch::randint(G, {B}, torch::kLong);
  auto prompt_len = torch::tensor({3, 4, 5, 6, 4, 7}, torch::kLong);
  auto x = sequences_around(dir, label, S);  // [B, S, C]
  // The responses: positions from prompt_len on, drawn around another (random) direction.
  auto other = sequences_around(dir, torch::randint(G, {B}, torch::kLong), S);
  auto pos = torch::arange(S).view({1, S, 1});
  auto y = torch::where(pos < prompt_len.view({B, 1, 1}), x, other);
  RouteContext ctx;
  ctx.n_seq = B;
  ctx.seq_len = S;
  ctx.prompt_len = prompt_len;
  auto px = router->route(x.reshape({B * S, C}), ctx);
  auto py = router->route(y.reshape({B * S, C}), ctx);
  EXPECT_TRUE(test::moce_token_clusters(px).equal(test::moce_token_clusters(py)))
      << "the response changed a cluster";
  auto tc = test::moce_token_clusters(px).view({B, S});
  RouteContext prefix = ctx;
  prefix.prompt_len = torch::Tensor();
  auto pp = test::moce_token_clusters(router->route(x.reshape({B * S, C}), prefix)).view({B, S});
  for (int64_t b = 0; b < B; ++b) {
    const int64_t P = prompt_len[b].item<int64_t>();
    EXPECT_TRUE(tc[b].narrow(0, 0, P).equal(pp[b].narrow(0, 0, P))) << "inside the prompt: the prefix pool";
    EXPECT_TRUE((tc[b].narrow(0, P - 1, S - P + 1) == tc[b][P - 1]).all().item<bool>()) << "row " << b;
    // The prompt's own nearest centroid.
    EXPECT_EQ(tc[b][P - 1].item<int64_t>(),
              nearest_centroid(x[b].narrow(0, 0, P).mean(0, true), dir)[0].item<int64_t>());
  }
  // Generation: the prompt in one chunk, then one position at a time with the running sum.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t P = prompt_len[b].item<int64_t>();
    RouteContext g;
    g.n_seq = 1;
    g.seq_len = P;
    g.prompt_len = prompt_len.narrow(0, b, 1);
    auto plan = router->route(y[b].narrow(0, 0, P), g);
    for (int64_t t = P; t < S; ++t) {
      g.seq_len = 1;
      g.cache = plan.cache;  // what the KV cache holds between steps
      plan = router->route(y[b].narrow(0, t, 1), g);
      EXPECT_EQ(test::moce_token_clusters(plan)[0].item<int64_t>(), tc[b][t].item<int64_t>())
          << "row " << b << " t " << t;
    }
  }
}

TEST(MoCE, OnlineCentroidsMoveTowardTheData) {
  torch::manual_seed(15);
  const int64_t G = 2, C = 8, B = 16, S = 4;
  auto cfg = moce_config();
  cfg.n_cluster = G;
  cfg.moce.centroid_decay = 0.9;
  MoCERouter router(cfg, C);
  router->train();
  auto dir = directions(G + 1, C);  // two cluster directions and one off-axis direction
  {
    torch::NoGradGuard ng;
    // Start each centroid tilted toward the off-axis direction: cosine 1/sqrt(2) with its cluster.
    router->centroids.copy_((dir.slice(0, 0, 2) + dir[2]) / std::sqrt(2.0));
    router->centroid_count.fill_(1);
  }
  // The router clusters pooled vectors centred on their running mean (MoCERouterImpl::embed): with two
  // equally likely clusters the centred cluster directions are +-(dir0 - dir1) / sqrt(2).
  auto axes = dir.slice(0, 0, 2);
  auto target = axes - axes.mean(0, true);
  target = target / target.norm(2, 1, true);
  auto cos_to_data = [&] { return (router->centroids * target).sum(1); };  // [G]
  auto before = cos_to_data();
  RouteContext ctx;
  ctx.training = true;
  ctx.n_seq = B;
  ctx.seq_len = S;
  for (int step = 0; step < 40; ++step) {
    auto label = torch::randint(G, {B}, torch::kLong);
    auto x = sequences_around(dir, label, S).reshape({B * S, C});
    auto plan = router->route(x, ctx);
    router->after_step(test::feedback_of(plan));
  }
  auto after = cos_to_data();
  std::printf("cosine centroid-to-cluster: before %.3f %.3f, after %.3f %.3f\n", before[0].item<double>(),
              before[1].item<double>(), after[0].item<double>(), after[1].item<double>());
  // 40 EMA steps at 0.9 leave 0.9^40 = 1.5% of the start; the data's own centred mean direction has cosine
  // ~0.99 with its target (noise 0.3 per coordinate around a centre of norm 3, averaged over 4 tokens).
  for (int64_t g = 0; g < G; ++g) {
    EXPECT_GT(after[g].item<double>(), before[g].item<double>() + 0.2) << "centroid " << g;
    EXPECT_GT(after[g].item<double>(), 0.97) << "centroid " << g;
  }
}

TEST(MoCE, OnlineClusteringSeedsCentroidsFromTheFirstBatch) {
  torch::manual_seed(16);
  const int64_t G = 2, C = 8, B = 8, S = 4;
  auto cfg = moce_config();
  cfg.n_cluster = G;
  MoCERouter router(cfg, C);
  auto dir = directions(G, C);
  auto label = torch::tensor({0, 0, 0, 1, 1, 0, 1, 1}, torch::kLong);
  RouteContext ctx;
  ctx.training = true;
  ctx.n_seq = B;
  ctx.seq_len = S;
  auto x = sequences_around(dir, label, S).reshape({B * S, C});
  auto first = router->route(x, ctx);  // no centroid yet: every sequence in group 0
  EXPECT_TRUE(test::moce_seq_clusters(first).equal(torch::zeros({B}, torch::kLong)))
      << test::moce_seq_clusters(first);
  // after_step seeds the centroids from the step's sequences (route() changes no buffer); farthest-point
  // seeding puts one centroid in each cluster, so the two labels then get different ids.
  router->after_step(test::feedback_of(first));
  auto plan = router->route(x, ctx);
  const auto ids = test::moce_seq_clusters(plan);
  EXPECT_TRUE(ids.equal(label) || ids.equal(1 - label)) << ids;
}

TEST(MoCE, GatesAndBalanceLossCarryGradientEvenWithK1) {
  torch::manual_seed(17);
  auto cfg = moce_config();  // K = 1, renormalize = true: the reference's no-gradient case
  cfg.balance_coef = 0;
  cfg.z_loss_coef = 0;
  MoELayer layer(cfg, 8);
  layer->train();
  RouteContext ctx;
  ctx.cache = test::moce_given_seq_clusters(torch::tensor({0, 1, 2, 3}, torch::kLong));
  auto x = torch::randn({4, 8, 8}, torch::requires_grad());
  auto out = layer->forward(x, ctx);
  out.y.pow(2).mean().backward();
  auto r = as_moce(layer);
  EXPECT_GT(r->group_weight.grad().abs().sum().item<double>(), 0) << "K = 1 gate must carry gradient";

  auto cfg2 = moce_config();
  cfg2.z_loss_coef = 0;
  MoCERouter balance_only(cfg2, 8);
  auto plan = balance_only->route(torch::randn({32, 8}), [] {
    RouteContext c;
    c.n_seq = 4;
    c.seq_len = 8;
    c.cache = test::moce_given_seq_clusters(torch::tensor({0, 1, 2, 3}, torch::kLong));
    return c;
  }());
  plan.aux_loss.backward();
  EXPECT_GT(balance_only->group_weight.grad().abs().sum().item<double>(), 0)
      << "the balance loss over the full group softmax must have a gradient";
}

// moe.moce_assign = "gate" (the MoCE ablation of docs/routing.md): every position's cluster is the argmax of
// the learned gate on its causal prefix pool plus the balance bias, the routed output is the one a scale of
// 1 gives, and the gate learns through the straight-through scale.
TEST(MoCE, LearnedGateAssignsByArgmaxOfItsPrefixPoolAndLearns) {
  torch::manual_seed(23);
  auto cfg = moce_config();
  cfg.moce.assign = MoceAssign::kGate;
  const int64_t B = 4, S = 6, C = 8;
  MoCERouter router(cfg, C);
  router->train();
  {
    torch::NoGradGuard ng;
    router->cluster_bias.copy_(torch::tensor({0.0, 0.3, -0.2, 0.1}));
  }
  auto x = torch::randn({B * S, C});
  RouteContext ctx;
  ctx.n_seq = B;
  ctx.seq_len = S;
  auto plan = router->route(x, ctx);
  // The definition: position t of sequence b takes argmax_g (W_s . mean(x[b, 0..t]) + bias_g).
  auto prefix = x.view({B, S, C}).cumsum(1) / torch::arange(1, S + 1, torch::kFloat).view({1, S, 1});
  auto want = (torch::matmul(prefix.reshape({B * S, C}), router->seq_gate.detach().t()) +
               router->cluster_bias.unsqueeze(0))
                  .argmax(1);
  EXPECT_TRUE(router->token_clusters(plan).equal(want)) << router->token_clusters(plan) << " vs " << want;
  // The scale is 1 in value (the routed output is what the centroid rule gives for the same clusters) and
  // carries the gate's gradient: d scale_t / d W_s = d p_c(t) / d W_s / p_c(t).
  ASSERT_TRUE(plan.token_scale.defined());
  EXPECT_TRUE(torch::allclose(plan.token_scale.detach(), torch::ones({B * S})));
  (plan.token_scale * torch::randn({B * S})).sum().backward();
  ASSERT_TRUE(router->seq_gate.grad().defined());
  EXPECT_GT(router->seq_gate.grad().abs().sum().item<double>(), 0) << "the gate must learn";
  // Without grad (evaluation, generation): the same clusters.
  torch::NoGradGuard ng;
  router->eval();
  EXPECT_TRUE(router->token_clusters(router->route(x, ctx)).equal(want));
}

// moe.moce_cluster_per_layer: by default a later MoCE layer keeps the first layer's clusters (the carry);
// with the option it assigns its own from its own centroids.
TEST(MoCE, ClusterPerLayerIgnoresTheEarlierLayersClusters) {
  torch::manual_seed(29);
  const int64_t G = 4, C = 8, B = 8, S = 5;
  auto dir = directions(G, C);
  auto label = torch::randint(G, {B}, torch::kLong);
  auto x = sequences_around(dir, label, S).reshape({B * S, C});
  RouteContext ctx;
  ctx.n_seq = B;
  ctx.seq_len = S;
  auto given = std::make_shared<MoceCarry>();
  given->token_cluster = ((label + 1) % G).unsqueeze(1).expand({B, S}).reshape({B * S}).clone();
  ctx.carry = given;
  for (bool per_layer : {false, true}) {
    auto cfg = moce_config();
    cfg.moce.cluster_per_layer = per_layer;
    MoCERouter router(cfg, C);
    {
      torch::NoGradGuard ng;
      router->centroids.copy_(dir);
      router->centroid_count.fill_(1);
    }
    auto plan = router->route(x, ctx);
    auto want = per_layer ? label.unsqueeze(1).expand({B, S}).reshape({B * S}) : given->token_cluster;
    EXPECT_TRUE(router->token_clusters(plan).equal(want)) << "cluster_per_layer = " << per_layer;
  }
}

TEST(MoCE, StateRoundTripGivesSameOutputsAndClusters) {
  torch::manual_seed(18);
  auto cfg = moce_config();
  cfg.moce.n_general = 0;
  MoELayer a(cfg, 8);
  a->train();
  for (int s = 0; s < 3; ++s) {
    torch::NoGradGuard ng;
    a->forward(torch::randn({8, 5, 8}));
    a->after_step();
  }
  MoELayer b(cfg, 8);
  {
    torch::NoGradGuard ng;
    auto pb = b->named_parameters(), bb = b->named_buffers();
    for (const auto& p : a->named_parameters()) pb[p.key()].copy_(p.value());
    for (const auto& p : a->named_buffers()) bb[p.key()].copy_(p.value());
  }
  a->eval();
  b->eval();
  torch::NoGradGuard ng;
  auto x = torch::randn({6, 5, 8});
  auto oa = a->forward(x), ob = b->forward(x);
  EXPECT_TRUE(test::moce_seq_clusters(ob.plan).equal(test::moce_seq_clusters(oa.plan)));
  EXPECT_TENSOR_NEAR(ob.y, oa.y, 0, 0);  // same weights, same ops: bit-identical
}

TEST(MoCE, BadConfigNamesTheField) {
  auto expect_field = [](MoEConfig c, const std::string& field) {
    test::expect_config_error([&] { c.validate(); }, field);  // validated where a config is read
  };
  auto c = moce_config();
  c.n_cluster = 3;  // 8 experts do not split into 3 groups
  expect_field(c, "moe.n_cluster");
  c = moce_config();
  c.n_expert_used = 3;  // > 2 experts per group
  expect_field(c, "moe.n_expert_used");
  c = moce_config();
  c.moce.n_general = 8;
  expect_field(c, "moe.moce_n_general");
  c = moce_config();
  c.moce.n_general = 4;
  c.moce.general_used = 5;
  expect_field(c, "moe.moce_general_used");
  c = moce_config();
  c.moce.centroid_decay = 1.5;
  expect_field(c, "moe.centroid_decay");
  c = moce_config();
  c.moce.assign = MoceAssign::kGate;  // offline centroids a gate would not use
  c.moce.clustering = SeqClustering::kTfidf;
  expect_field(c, "moe.moce_clustering");
  c = moce_config();
  c.router = "topk";  // MoCE's options on another router are not silently ignored
  c.moce.assign = MoceAssign::kGate;
  expect_field(c, "moe.moce_assign");
  c.moce.assign = MoceAssign::kCentroid;
  c.moce.cluster_per_layer = true;
  expect_field(c, "moe.moce_cluster_per_layer");
}

}  // namespace
}  // namespace moeforge
