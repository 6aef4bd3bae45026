// Router features wired into training, evaluation and the CLI: expert pruning masks (every router family),
// `prune` on a checkpoint, expert-choice evaluation with both routings, MoCE offline clustering whose
// centroids reproduce the training clusters by nearest-centroid assignment. Tiny generated corpus, as in
// test_trainer.cpp.
#include <cmath>
#include <filesystem>
#include <fstream>

#include "moeforge/data/prepare.h"
#include "moeforge/experiments/prune.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/load.h"
#include "moeforge/routing/expert_choice.h"
#include "moeforge/routing/moce.h"
#include "moeforge/train/sequence_clustering.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

// The tiny two-domain corpus of test_util, with this file's shorter runs.
RunConfig tiny_config(const std::string& name, std::vector<std::string> extra) {
  std::vector<std::string> o = {"train.steps=12", "train.warmup=3", "train.log_every=4",
                                "data.validation_fraction=0.25"};
  o.insert(o.end(), extra.begin(), extra.end());
  return load_run_config_text("", "test", test::tiny_run_overrides("features_" + name, o));
}

TrainOptions opts(const std::string& name) {
  TrainOptions t;
  t.out_dir = (fs::path(::testing::TempDir()) / ("moeforge_features_" + name)).string();
  fs::remove_all(t.out_dir);
  t.progress = false;
  return t;
}

MoEConfig layer_config(const std::string& router) {
  MoEConfig c;
  c.router = router;
  c.n_expert = 4;
  c.n_expert_used = router == "moce" ? 1 : 2;
  c.d_expert = 16;
  c.n_cluster = 2;
  return c;
}

// ---- Pruning masks --------------------------------------------------------------------------------------

TEST(Pruning, UnusedExpertLeavesOutputUnchanged) {
  torch::manual_seed(3);
  for (const std::string router : {"topk", "loss_free", "expert_choice"}) {
    auto cfg = layer_config(router);
    if (router == "expert_choice")
      cfg.expert_choice.mode = ECMode::kThreshold;  // EC's per-token routing can idle one
    MoELayer layer(cfg, 8);
    layer->eval();
    torch::NoGradGuard ng;
    auto x = torch::rand({2, 6, 8}) + 0.1;  // [B, S, C] positive rows
    // Expert 3's router row points against every token: its logit is far below the others, so no token
    // (and for EC no threshold) ever selects it.
    for (auto& p : layer->router->named_parameters())
      if (p.key() == "weight") p.value()[3].fill_(-5.0);
    auto before = layer->forward(x);
    ASSERT_EQ(before.plan.stats.load[3], 0) << router;
    auto active = torch::ones({4});
    active[3] = 0;
    layer->router->set_expert_mask(active);
    auto after = layer->forward(x);
    // Same selection, unmasked scores as gates, same expert arithmetic: bit-identical, so no tolerance.
    EXPECT_TRUE(torch::equal(before.y, after.y))
        << router << ": max diff " << (before.y - after.y).abs().max().item<double>();
    EXPECT_EQ(layer->router->pruned_experts(), std::vector<int64_t>{3});
  }
}

TEST(Pruning, PrunedExpertGetsNoAssignments) {
  torch::manual_seed(4);
  for (const std::string router : {"topk", "bip", "expert_choice", "moce", "hierarchical"}) {
    for (bool training : {true, false}) {
      auto cfg = layer_config(router);
      if (router == "moce") cfg.n_expert_used = 1;
      MoELayer layer(cfg, 8);
      training ? layer->train() : layer->eval();
      auto x = torch::randn({4, 8, 8});  // [B, S, C]
      auto plan = layer->forward(x).plan;
      // Prune the busiest expert: the one most likely to be chosen without the mask.
      int64_t busiest = 0;
      for (int64_t e = 1; e < 4; ++e)
        if (plan.stats.load[e] > plan.stats.load[busiest]) busiest = e;
      auto active = torch::ones({4});
      active[busiest] = 0;
      layer->router->set_expert_mask(active);
      auto pruned = layer->forward(x).plan;
      EXPECT_EQ(pruned.stats.load[busiest], 0) << router << " training=" << training;
      if (router == "topk" || router == "bip") {  // dropless token choice: every token still gets K experts
        EXPECT_EQ(pruned.n_assign(), 4 * 8 * 2) << router;
      }
    }
  }
}

TEST(Pruning, TooFewExpertsIsAnError) {
  MoELayer topk(layer_config("topk"), 8);  // K = 2 of 4
  auto active = torch::zeros({4});
  active[0] = 1;
  EXPECT_THROW(topk->router->set_expert_mask(active), std::invalid_argument);
  EXPECT_THROW(topk->router->set_expert_mask(torch::ones({3})), std::invalid_argument);
  MoELayer moce(layer_config("moce"), 8);  // 2 groups of 2, K = 1: each group needs one expert
  auto group0_gone = torch::ones({4});
  group0_gone[0] = 0;
  group0_gone[1] = 0;
  EXPECT_THROW(moce->router->set_expert_mask(group0_gone), std::invalid_argument);
}

// ---- prune on a checkpoint, EC evaluation, offline clustering ------------------------------------------

TEST(PruneCheckpoint, MasksExpertsAndReportsPerplexity) {
  std::ostringstream log;
  auto trained = train_model(tiny_config("prune", {"moe.n_expert_used=1"}), opts("prune"), log);
  PruneOptions p;
  p.checkpoint = trained.checkpoint;
  p.out_dir = opts("prune_out0").out_dir;
  p.min_load = 0.0;  // measures the shares, prunes nothing
  auto none = prune_checkpoint(p, log);
  ASSERT_EQ(none.share.size(), 2u);
  for (auto& l : none.pruned) EXPECT_TRUE(l.empty());
  // Nothing pruned: the same model on the same data.
  EXPECT_DOUBLE_EQ(none.ppl_before, none.ppl_after);
  // Now prune each layer's least-loaded expert (threshold just above the smallest share).
  double smallest = 1;
  for (auto& l : none.share)
    for (double s : l) smallest = std::min(smallest, s);
  p.out_dir = opts("prune_out1").out_dir;
  p.min_load = smallest + 1e-9;
  auto r = prune_checkpoint(p, log);
  size_t n_pruned = 0;
  for (auto& l : r.pruned) n_pruned += l.size();
  EXPECT_GE(n_pruned, 1u) << log.str();
  EXPECT_TRUE(std::isfinite(r.ppl_after));
  // The pruned checkpoint keeps its masks and evaluates to the reported perplexity.
  auto lm = load_model(r.out_dir);
  auto layers = lm.model->moe_layers();
  for (size_t l = 0; l < layers.size(); ++l) EXPECT_EQ(layers[l]->router->pruned_experts(), r.pruned[l]);
  const std::string tok = lm.tokenizer->serialized();
  auto data = prepare_data(lm.cfg.data, &tok, log);
  auto ev = evaluate(lm.model, data.validation, lm.cfg.train.batch_size, 0, "validation");
  EXPECT_NEAR(ev.perplexity, r.ppl_after,
              1e-9 * r.ppl_after);  // same arithmetic; 1e-9 for the text round trip
  for (size_t l = 0; l < ev.layers.size(); ++l)
    for (int64_t e : r.pruned[l]) EXPECT_EQ(ev.layers[l].load[e], 0);
}

TEST(PruneCheckpoint, BadFlagsAreNamed) {
  std::ostringstream log;
  PruneOptions p;
  p.checkpoint = "/nonexistent/moeforge-ckpt";
  p.out_dir = "/tmp/unused";
  p.min_load = 0.1;
  EXPECT_THROW(prune_checkpoint(p, log), FileError);
  p.min_load = 1.5;
  try {
    prune_checkpoint(p, log);
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "--min-load");
  }
  p.min_load = 0.1;
  p.out_dir = "";
  try {
    prune_checkpoint(p, log);
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "--out");
  }
}

TEST(ExpertChoiceEval, ReportsBatchAndThresholdLosses) {
  std::ostringstream log;
  auto o = opts("ec");
  auto s = train_model(tiny_config("ec", {"moe.router=\"expert_choice\""}), o, log);
  ASSERT_TRUE(s.validation.has_value());
  const auto& v = *s.validation;
  ASSERT_TRUE(v.has_ec);
  EXPECT_TRUE(std::isfinite(v.ec_batch_loss) && std::isfinite(v.ec_threshold_loss));
  EXPECT_EQ(v.loss, v.ec_threshold_loss);  // moe.ec_eval defaults to threshold: the reported loss is that one
  EXPECT_NE(v.ec_batch_loss, v.ec_threshold_loss);  // two different routings of 32+ tokens
  EXPECT_NE(log.str().find("threshold-routed"), std::string::npos) << log.str();
  std::ifstream metrics(fs::path(o.out_dir) / "metrics.jsonl");
  bool found = false;
  for (std::string line; std::getline(metrics, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["split"] != "validation") continue;
    found = j.contains("ec_batch_loss") && j.contains("ec_threshold_loss") && j.contains("ec_gap");
  }
  EXPECT_TRUE(found);
}

TEST(OfflineClustering, HiddenCentroidsReproduceTrainingClusters) {
  std::ostringstream log;
  const std::vector<std::string> moce = {"moe.router=\"moce\"", "moe.n_expert_used=1", "moe.n_cluster=2"};
  auto base = train_model(tiny_config("moce", moce), opts("moce_base"), log);
  auto lm = load_model(base.checkpoint);
  const std::string tok = lm.tokenizer->serialized();
  auto data = prepare_data(lm.cfg.data, &tok, log);
  Router::OfflineClustering hidden;
  hidden.method = "hidden";
  hidden.key = "moe.moce_clustering";
  hidden.n_cluster = 2;
  auto c = cluster_sequences(lm.model, data.train, hidden, lm.tokenizer->vocab_size(), 1, 4);
  ASSERT_EQ(c.assignment.numel(), data.train.size());
  EXPECT_EQ(c.sizes.sum().item<double>(), double(data.train.size()));
  set_router_centroids(lm.model, c, hidden.key);
  // Generation-time assignment (nearest router centroid of the same pooled representation) gives every
  // training sequence its k-means cluster. Float32 cosine ties are the only way to differ: allow 1%.
  auto router = std::dynamic_pointer_cast<MoCERouterImpl>(lm.model->moe_layers()[0]->router);
  auto assigned = router->assign(sequence_representations(lm.model, data.train, 4));
  const double agree = (assigned == c.assignment).to(torch::kDouble).mean().item<double>();
  EXPECT_GE(agree, 0.99);

  // Training with --init and "hidden": ids are given per sequence, the log reports the clusters, and
  // evaluation reports the cluster x domain table.
  auto o = opts("moce_hidden");
  o.init_from = base.checkpoint;
  auto cfg = tiny_config("moce", moce);
  cfg.moe.moce.clustering = SeqClustering::kHidden;
  cfg.train.steps = 4;
  auto s = train_model(cfg, o, log);
  EXPECT_NE(log.str().find("clusters (hidden"), std::string::npos) << log.str();
  ASSERT_TRUE(s.validation.has_value());
  ASSERT_EQ(s.validation->cluster_domain.size(), 2u);
  EXPECT_GE(s.validation->cluster_purity, 0.5);  // two domains: purity is at least 1/2 by definition
  EXPECT_LE(s.validation->cluster_purity, 1.0);
  // A resume continues from the centroids the checkpoint's router buffers hold: no second clustering.
  std::ostringstream resumed_log;
  auto r = opts("moce_hidden_resumed");
  r.resume = s.checkpoint;
  r.resume_overrides = {"train.steps=6"};
  auto rs = train_model(RunConfig{}, r, resumed_log);
  EXPECT_EQ(rs.step, 6);
  EXPECT_EQ(resumed_log.str().find("clusters ("), std::string::npos) << resumed_log.str();
}

TEST(OfflineClustering, TfidfAndBadSettings) {
  std::ostringstream log;
  auto cfg = tiny_config("tfidf", {"moe.router=\"moce\"", "moe.n_expert_used=1", "moe.n_cluster=2",
                                   "moe.moce_clustering=\"tfidf\"", "train.steps=3"});
  auto s = train_model(cfg, opts("tfidf"), log);
  EXPECT_NE(log.str().find("clusters (tfidf"), std::string::npos) << log.str();
  // "hidden" needs a trained checkpoint; other routers have no sequence clusters.
  cfg.moe.moce.clustering = SeqClustering::kHidden;
  try {
    train_model(cfg, opts("hidden_noinit"), log);
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "moe.moce_clustering");
  }
  try {
    tiny_config("x", {"moe.moce_clustering=\"hidden\""});
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "moe.moce_clustering");
  }
}

}  // namespace
}  // namespace moeforge
