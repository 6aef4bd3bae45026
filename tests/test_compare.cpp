// moeforge compare on a tiny generated corpus: every field for every router in compare.json, the same data
// and seed for each run, the equal-compute rule, and errors that name --routers.
#include <filesystem>
#include <fstream>

#include "moeforge/routing/registry.h"
#include "moeforge/train/compare.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

// Three "genres" of templated sentences; "food" is held out, so the held-out perplexity is measured too.
std::string corpus_dir() {
  static const std::string dir =
      test::shared_test_dir("moeforge_compare_corpus_v2", [](const fs::path& root) {
        const std::vector<std::pair<std::string, std::vector<std::string>>> genres = {
            {"animals", {"cat", "dog", "bird", "fox", "horse", "mouse"}},
            {"tools", {"hammer", "saw", "drill", "wrench", "chisel"}},
            {"food", {"bread", "apple", "soup", "cheese"}}};
        const char* verbs[] = {"sees", "holds", "likes", "follows"};
        for (int f = 0; f < 6; ++f)
          for (auto& [genre, nouns] : genres) {
            fs::create_directories(root / genre);
            std::ofstream out(root / genre / ("doc" + std::to_string(f) + ".txt"));
            const size_t n = nouns.size();
            for (size_t i = 0; i < 60; ++i)
              out << "the " << nouns[(i + f) % n] << " " << verbs[i % 4] << " the " << nouns[(i * 7 + f) % n]
                  << ". ";
          }
      });
  return dir;
}

RunConfig tiny_config(const std::string& name, std::vector<std::string> extra = {}) {
  // The shared tiny run (test_util), on this file's corpus, with evaluations inside its 6 steps.
  std::vector<std::string> o = {"moe.n_expert_used=2",
                                "moe.n_cluster=2",
                                "train.steps=6",
                                "train.warmup=2",
                                "train.eval_every=3",
                                "train.log_every=1",
                                "data.corpus=\"text:" + corpus_dir() + "\"",
                                "data.heldout_genres=[\"food\"]"};
  o.insert(o.end(), extra.begin(), extra.end());
  return load_run_config_text("", "test", test::tiny_run_overrides("compare_" + name, o));
}

CompareOptions opts(const std::string& name, std::vector<std::string> routers, bool plots) {
  CompareOptions c;
  c.routers = std::move(routers);
  c.out_dir = (fs::path(::testing::TempDir()) / ("moeforge_compare_" + name)).string();
  fs::remove_all(c.out_dir);
  c.progress = false;
  c.plots = plots;
  c.command = "test";
  return c;
}

TEST(Compare, TwoRoutersWriteEveryFieldWithTheSameDataAndCompute) {
  std::ostringstream log;
  const auto cfg = tiny_config("two");
  const auto o = opts("two", {"topk", "expert_choice"}, /*plots=*/true);
  const auto result = run_compare(cfg, o, log);
  // What is on disk is what was returned.
  std::ifstream in(fs::path(o.out_dir) / "compare.json");
  ASSERT_TRUE(in.good());
  const auto j = nlohmann::json::parse(in);
  ASSERT_EQ(j, result);
  ASSERT_EQ(j["runs"].size(), 2u);
  for (const char* f : {"command", "machine", "routers", "k", "steps", "batch_size", "seq_len", "seed",
                        "config", "gap_tokens"})
    EXPECT_TRUE(j.contains(f)) << f;

  const int64_t K = 2, T = 4 * 16;  // moe.n_expert_used; batch_size * seq_len
  for (auto& r : j["runs"]) {
    const std::string name = r["router"];
    SCOPED_TRACE(name);
    for (const char* f : {"equal_compute", "moe", "active_params_per_token", "mflop_per_token", "steps",
                          "seconds", "tokens_per_s", "first_batch", "train_loss", "max_vio_batch_steps",
                          "max_vio_batch_mean", "validation", "heldout", "validation_curve", "heldout_curve",
                          "dead_experts", "optimality_gap", "causal_leak", "checkpoint"})
      EXPECT_TRUE(r.contains(f)) << f;
    EXPECT_EQ(r["steps"], 6);
    EXPECT_EQ(r["train_loss"].size(), 6u);
    EXPECT_EQ(r["max_vio_batch_steps"].size(), 6u);
    for (const char* split : {"validation", "heldout"}) {
      ASSERT_FALSE(r[split].is_null()) << split;
      for (const char* f : {"loss", "perplexity", "tokens", "max_vio_global", "specialization", "layers"})
        EXPECT_TRUE(r[split].contains(f)) << split << "." << f;
      EXPECT_TRUE(std::isfinite(r[split]["perplexity"].get<double>()));
    }
    // Evaluations at steps 3 and 6 (train.eval_every = 3).
    EXPECT_EQ(r["validation_curve"].size(), 2u);
    for (const char* f : {"gap", "capacity_violation", "tokens", "k", "cap"})
      EXPECT_TRUE(r["optimality_gap"].contains(f)) << f;
    // A gap is a share of the optimum: the router cannot beat the exact optimum by more than it overfills
    // capacity, and cannot lose more than all of it.
    EXPECT_LE(r["optimality_gap"]["gap"].get<double>(), 1.0);
    EXPECT_GE(r["causal_leak"]["eval"].get<double>(), 0.0);
    // Both routers route causally in evaluation (EC by thresholds) and in training (EC "causal" mode picks
    // among the tokens at one position). 1e-5: float32 noise of recomputing a [4, 16, 32] layer output.
    EXPECT_LT(r["causal_leak"]["eval"].get<double>(), 1e-5);
    EXPECT_LT(r["causal_leak"]["train"].get<double>(), 1e-5);
    EXPECT_TRUE(fs::exists(fs::path(o.out_dir) / name / "metrics.jsonl"));
    EXPECT_TRUE(fs::exists(fs::path(r["checkpoint"].get<std::string>()) / "manifest.json"));

    // Equal compute: every training batch of both routers made exactly K * T assignments per MoE layer
    // (top-K dropless; EC with capacity factor K takes round(T * K / E) = 32 tokens for each of 4 experts).
    std::ifstream metrics(fs::path(o.out_dir) / name / "metrics.jsonl");
    int train_lines = 0;
    for (std::string line; std::getline(metrics, line);) {
      auto m = nlohmann::json::parse(line);
      if (m["split"] != "train") continue;
      ++train_lines;
      for (auto& layer_load : m["load"]) {
        int64_t sum = 0;
        for (auto& x : layer_load) sum += x.get<int64_t>();
        EXPECT_EQ(sum, K * T) << line;
      }
    }
    EXPECT_EQ(train_lines, 6);
  }
  // Same data and seed: both runs drew the identical first batch.
  EXPECT_EQ(j["runs"][0]["first_batch"], j["runs"][1]["first_batch"]);
  EXPECT_EQ(j["runs"][0]["first_batch"]["tokens"], 4 * 17);  // batch_size * (seq_len + 1)
  EXPECT_EQ(j["runs"][0]["validation"]["tokens"], j["runs"][1]["validation"]["tokens"]);
  // The equal-compute rule as recorded.
  EXPECT_EQ(j["runs"][1]["moe"]["ec_capacity_factor"].get<double>(), 2.0);
  EXPECT_EQ(j["runs"][0]["moe"]["n_expert_used"], 2);

  for (const char* f : {"compare.md", "plots/loss.png", "plots/bars.png", "plots/max_vio_batch.png",
                        "topk/report.md", "expert_choice/report.md"})
    EXPECT_TRUE(fs::exists(fs::path(o.out_dir) / f)) << f;
}

TEST(Compare, EqualComputeRule) {
  const auto cfg = tiny_config("rule");  // E = 4, K = 2, 2 clusters
  std::string how;
  auto ec = equal_compute_config(cfg, "expert_choice", &how);
  EXPECT_EQ(ec.moe.ec_capacity_factor, 2.0) << how;
  auto h = equal_compute_config(cfg, "hierarchical", &how);
  EXPECT_EQ(h.moe.n_cluster_used * h.moe.n_expert_used, 2) << how;
  EXPECT_EQ(h.moe.n_cluster_used, 1) << how;  // the fewest clusters: K_e = 2 fits in a cluster of 2
  // K = 4 does not fit one cluster of 2 experts: 2 clusters x 2.
  auto h4 = equal_compute_config(tiny_config("rule", {"moe.n_expert_used=4"}), "hierarchical", &how);
  EXPECT_EQ(h4.moe.n_cluster_used, 2) << how;
  EXPECT_EQ(h4.moe.n_expert_used, 2) << how;
  auto m = equal_compute_config(cfg, "moce", &how);
  EXPECT_EQ(m.moe.n_expert_used, 2) << how;
  for (const char* r : {"topk", "loss_free", "bip"})
    EXPECT_EQ(equal_compute_config(cfg, r).moe.n_expert_used, 2);
  for (auto& r : router_names()) EXPECT_EQ(equal_compute_config(cfg, r).moe.router, r);
}

TEST(Compare, EveryRouterRunsAndIsMeasured) {
  // Two steps each: the point is that every router's scores, gap and leak can be measured, not quality.
  std::ostringstream log;
  const auto o = opts("all", {}, /*plots=*/false);
  const auto j = run_compare(tiny_config("all", {"train.steps=2", "train.eval_every=0"}), o, log);
  ASSERT_EQ(j["runs"].size(), router_names().size());
  for (auto& r : j["runs"]) {
    SCOPED_TRACE(r["router"].get<std::string>());
    EXPECT_TRUE(std::isfinite(r["optimality_gap"]["gap"].get<double>()));
    EXPECT_TRUE(std::isfinite(r["causal_leak"]["train"].get<double>()));
    EXPECT_EQ(r["first_batch"], j["runs"][0]["first_batch"]);
  }
  EXPECT_TRUE(fs::exists(fs::path(o.out_dir) / "compare.md"));
}

TEST(Compare, BadRouterNamesAreNamed) {
  try {
    parse_router_list("topk,nonsense");
    ADD_FAILURE() << "no error for an unknown router";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "--routers");
    EXPECT_NE(std::string(e.what()).find("nonsense"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_router_list("topk,topk"), ConfigError);
  EXPECT_EQ(parse_router_list("").size(), router_names().size());
  EXPECT_EQ(parse_router_list("bip,topk"), (std::vector<std::string>{"bip", "topk"}));
  EXPECT_THROW(equal_compute_config(tiny_config("bad"), "nonsense"), ConfigError);
}

}  // namespace
}  // namespace moeforge
