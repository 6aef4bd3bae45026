// moeforge compare on a tiny generated corpus: variants x seeds with every field in compare.json, the same
// data for the same seed, the equal-compute rule measured, resume after an interruption (between runs and
// in the middle of one), the report's verdicts from synthetic numbers, fault injection, and errors that
// name the key.
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <tuple>

#include "moeforge/experiments/compare.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/routing/registry.h"
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

// The shared tiny run (test_util) on this file's corpus, with evaluations inside its 6 steps.
std::vector<std::string> tiny_overrides(const std::string& name, std::vector<std::string> extra = {}) {
  std::vector<std::string> o = {"moe.n_expert_used=2",
                                "moe.n_cluster=2",
                                "train.steps=6",
                                "train.warmup=2",
                                "train.eval_every=3",
                                "train.log_every=1",
                                "data.corpus=\"text:" + corpus_dir() + "\"",
                                "data.heldout_genres=[\"food\"]"};
  o.insert(o.end(), extra.begin(), extra.end());
  return test::tiny_run_overrides("compare_" + name, o);
}

RunConfig tiny_config(const std::string& name, std::vector<std::string> extra = {}) {
  return load_run_config_text("", "test", tiny_overrides(name, std::move(extra)));
}

std::string write_toml(const std::string& name, const std::string& text) {
  const auto p = fs::path(::testing::TempDir()) / ("moeforge_compare_" + name + ".toml");
  std::ofstream(p) << text;
  return p.string();
}

// Two variants (top-2 with the Switch loss, causal expert choice) x seeds 1, 2.
const char* kTwoByTwo = R"(
[compare]
seeds = [1, 2]
[[compare.variant]]
name = "top2-switch"
router = "topk"
set = ["moe.balance_coef=0.01"]
role = "balance_loss"
[[compare.variant]]
name = "ec"
router = "expert_choice"
set = ["moe.ec_mode=\"causal\""]
role = "expert_choice"
)";

ComparePlan two_by_two(const std::string& name) {
  auto plan = load_compare_plan(write_toml(name, kTwoByTwo), tiny_overrides(name));
  resolve_compare_plan(plan);
  return plan;
}

CompareOptions opts(const std::string& name, bool plots) {
  CompareOptions c;
  c.out_dir = (fs::path(::testing::TempDir()) / ("moeforge_compare_" + name)).string();
  fs::remove_all(c.out_dir);
  c.progress = false;
  c.plots = plots;
  c.command = "test";
  return c;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

TEST(Compare, VariantsTimesSeedsWriteEveryFieldWithTheSameDataAndCompute) {
  std::ostringstream log;
  const auto plan = two_by_two("two");
  auto o = opts("two", /*plots=*/true);
  int throughput_calls = 0;
  o.throughput = [&](const std::vector<CompareVariant>& v, std::ostream&) {
    ++throughput_calls;
    nlohmann::json t = {{"variants", nlohmann::json::object()}};
    for (auto& x : v) t["variants"][x.name] = {{"tokens_per_s", 1000.0}};
    return t;
  };
  const auto result = run_compare(plan, o, log);
  EXPECT_EQ(throughput_calls, 1);
  const auto j = read_json(fs::path(o.out_dir) / "compare.json");
  ASSERT_EQ(j, result);
  EXPECT_TRUE(j["complete"].get<bool>());
  ASSERT_EQ(j["runs"].size(), 4u);
  // Seed-major order: every variant's seed 1, then seed 2.
  EXPECT_EQ(j["runs"][0]["seed"], 1);
  EXPECT_EQ(j["runs"][1]["seed"], 1);
  EXPECT_EQ(j["runs"][2]["seed"], 2);
  for (const char* f : {"command", "machine", "seeds", "k", "steps", "batch_size", "seq_len", "config",
                        "variants", "throughput", "seconds_total"})
    EXPECT_TRUE(j.contains(f)) << f;

  const double K = 2;  // moe.n_expert_used
  for (auto& r : j["runs"]) {
    SCOPED_TRACE(r["variant"].get<std::string>() + " seed " + std::to_string(r["seed"].get<int>()));
    for (const char* f : {"variant",
                          "router",
                          "role",
                          "group",
                          "seed",
                          "equal_compute",
                          "moe",
                          "steps",
                          "curve",
                          "load_steps",
                          "max_vio_batch_mean",
                          "dropped_share_mean",
                          "assignments_per_token_train",
                          "time_to_balance",
                          "validation",
                          "heldout",
                          "validation_curve",
                          "optimality_gap",
                          "causal_leak",
                          "first_batch",
                          "checkpoint"})
      EXPECT_TRUE(r.contains(f)) << f;
    EXPECT_EQ(r["steps"], 6);
    EXPECT_EQ(r["curve"]["step"].size(), 6u);  // train.log_every = 1
    EXPECT_EQ(r["load_steps"].size(), 6u);
    EXPECT_EQ(r["validation_curve"].size(), 2u);  // steps 3 and 6
    // run.json's time to balance is the report's: the shared threshold and window (compare.h).
    EXPECT_EQ(r["time_to_balance"].get<int64_t>(),
              time_to_balance(r["curve"]["step"].get<std::vector<int64_t>>(),
                              r["curve"]["max_vio_batch"].get<std::vector<double>>(), kBalanceThreshold,
                              kBalanceWindow));
    // Equal compute, measured: top-K dropless and EC with capacity factor K (round(T K / E) tokens per
    // expert, T K / E = 32 exactly here) both make exactly K assignments per token in training.
    EXPECT_DOUBLE_EQ(r["assignments_per_token_train"].get<double>(), K);
    EXPECT_GT(r["validation"]["assignments_per_token"].get<double>(), 0.0);
    for (auto& a : r["curve"]["assignments_per_token"]) EXPECT_DOUBLE_EQ(a.get<double>(), K);
    for (const char* split : {"validation", "heldout"})
      EXPECT_TRUE(std::isfinite(r[split]["perplexity"].get<double>())) << split;
    // Both route causally (EC "causal" picks among tokens at one position; evaluation by thresholds).
    // 1e-5: float32 noise of recomputing a [4, 16, 32] layer output.
    EXPECT_LT(r["causal_leak"]["train"].get<double>(), 1e-5);
    EXPECT_TRUE(fs::exists(fs::path(o.out_dir) / r["variant"].get<std::string>() /
                           ("seed" + std::to_string(r["seed"].get<int>())) / "run.json"));
  }
  // Same seed, same data: both variants drew the identical first batch; another seed draws another.
  EXPECT_EQ(j["runs"][0]["first_batch"], j["runs"][1]["first_batch"]);
  EXPECT_NE(j["runs"][0]["first_batch"]["digest"], j["runs"][2]["first_batch"]["digest"]);
  EXPECT_EQ(j["runs"][1]["moe"]["ec_capacity_factor"].get<double>(), 2.0);

  std::ifstream md(fs::path(o.out_dir) / "report.md");
  std::stringstream ss;
  ss << md.rdbuf();
  for (const char* s : {"top2-switch", "ec", "mean ± sample standard deviation", "### 3. Expert choice"})
    EXPECT_NE(ss.str().find(s), std::string::npos) << s;
  for (const char* f : {"report.md", "plots/loss.png", "plots/bars.png", "plots/max_vio_batch.png",
                        "plots/load_heatmaps.png", "plots/genre_expert.png", "top2-switch/seed1/report.md"})
    EXPECT_TRUE(fs::exists(fs::path(o.out_dir) / f)) << f;

  // --render-only: the same report from the JSON alone.
  fs::remove(fs::path(o.out_dir) / "report.md");
  write_compare_outputs(o.out_dir, j, /*plots=*/false);
  std::ifstream md2(fs::path(o.out_dir) / "report.md");
  std::stringstream ss2;
  ss2 << md2.rdbuf();
  EXPECT_NE(ss2.str().find("top2-switch"), std::string::npos);
}

TEST(Compare, ResumesAfterAnInterruptionWithoutRedoingFinishedRuns) {
  const auto plan = two_by_two("resume");
  // Reference: the same comparison uninterrupted.
  std::ostringstream log0;
  const auto whole = run_compare(plan, opts("resume_whole", false), log0);

  // Interrupted: the first run finished, the second stopped after 3 of its 6 steps (with a checkpoint).
  auto o = opts("resume", false);
  o.stop_after_runs = 1;
  o.stop_after_steps = 3;
  std::ostringstream log1;
  const auto part = run_compare(plan, o, log1);
  EXPECT_FALSE(part["complete"].get<bool>());
  ASSERT_EQ(part["runs"].size(), 1u);
  const fs::path first = fs::path(o.out_dir) / "top2-switch" / "seed1" / "run.json";
  const fs::path second = fs::path(o.out_dir) / "ec" / "seed1";
  ASSERT_TRUE(fs::exists(first));
  EXPECT_FALSE(fs::exists(second / "run.json"));
  EXPECT_TRUE(fs::exists(second / "checkpoints"));
  const auto first_time = fs::last_write_time(first);

  // The same command again: the finished run is kept, the interrupted one resumes, the rest run.
  o.stop_after_runs = 0;
  o.stop_after_steps = 0;
  std::ostringstream log2;
  const auto done = run_compare(plan, o, log2);
  EXPECT_TRUE(done["complete"].get<bool>());
  ASSERT_EQ(done["runs"].size(), 4u);
  EXPECT_EQ(fs::last_write_time(first), first_time);
  EXPECT_NE(log2.str().find("finished earlier, kept"), std::string::npos) << log2.str();
  EXPECT_NE(log2.str().find("resuming from"), std::string::npos) << log2.str();
  // The resumed run's losses are the uninterrupted run's: resume is exact on CPU (trainer tests), and
  // every step is logged. 1e-6 relative: float32 losses printed and parsed back through JSON.
  for (size_t i = 0; i < 4; ++i) {
    const auto& a = whole["runs"][i]["curve"]["loss"];
    const auto& b = done["runs"][i]["curve"]["loss"];
    ASSERT_EQ(a.size(), b.size());
    for (size_t s = 0; s < a.size(); ++s)
      EXPECT_NEAR(a[s].get<double>(), b[s].get<double>(), 1e-6 * std::abs(a[s].get<double>()))
          << i << " " << s;
  }
  // A finished run made with another config is an error naming the folder, not silently reused.
  auto changed =
      load_compare_plan(write_toml("resume_changed", kTwoByTwo), tiny_overrides("resume", {"train.lr=5e-3"}));
  resolve_compare_plan(changed);
  std::ostringstream log3;
  try {
    run_compare(changed, o, log3);
    ADD_FAILURE() << "a changed config reused the finished runs";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("another config"), std::string::npos) << e.what();
  }
}

// An earlier comparison's runs are taken instead of retrained when their config is today's except for keys
// moeforge gained since; a run whose config differs in any value is trained again.
TEST(Compare, ReusesAnEarlierComparisonsRunsOfTheSameConfig) {
  const std::string before = "[data]\nseq_len = 32\n\n[train]\nlr = 0.01\nsteps = 6\n\n# fault: none\n";
  std::vector<std::string> added;
  std::string differs;
  // A key added since, also a multi-line one: the earlier run ran today's config.
  EXPECT_TRUE(
      fingerprint_extends(before,
                          "[data]\nbad_lines = 'stop'\nseq_len = 32\ntasks = [\n    'a',\n    'b'\n]\n\n"
                          "[train]\nlr = 0.01\nprecision = 'fp32'\nsteps = 6\n\n# fault: none\n",
                          &added));
  EXPECT_EQ(added, (std::vector<std::string>{"data.bad_lines = 'stop'", "data.tasks = [",
                                             "train.precision = 'fp32'"}));
  // A changed value, a removed key, another fault, or the same key under another section: not the same run.
  EXPECT_FALSE(fingerprint_extends(
      before, "[data]\nseq_len = 32\n\n[train]\nlr = 0.02\nsteps = 6\n\n# fault: none\n", nullptr, &differs));
  EXPECT_NE(differs.find("lr = 0.01"), std::string::npos) << differs;
  EXPECT_FALSE(
      fingerprint_extends(before, "[data]\nseq_len = 32\n\n[train]\nlr = 0.01\n\n# fault: none\n", nullptr));
  EXPECT_FALSE(fingerprint_extends(
      before, "[data]\nseq_len = 32\n\n[train]\nlr = 0.01\nsteps = 6\n\n# fault: x100\n", nullptr));
  EXPECT_FALSE(fingerprint_extends(
      before, "[data]\nlr = 0.01\nseq_len = 32\n\n[train]\nsteps = 6\n\n# fault: none\n", nullptr));

  // A comparison of two variants x two seeds; a second one (one variant changed, as a later moeforge
  // would write its new keys) takes the three runs that are the same and trains the fourth.
  const auto plan = two_by_two("reuse_src");
  std::ostringstream log0;
  auto src = run_compare(plan, opts("reuse_src", false), log0);
  for (auto& r : src["runs"])  // as if made before train.precision existed
    r["fingerprint"] =
        std::regex_replace(r["fingerprint"].get<std::string>(), std::regex("precision = .*\n"), "");
  const auto src_json = (fs::path(::testing::TempDir()) / "moeforge_compare_reuse_src.json").string();
  std::ofstream(src_json) << src.dump();
  auto changed = load_compare_plan(write_toml("reuse", kTwoByTwo), tiny_overrides("reuse_src"));
  resolve_compare_plan(changed);
  changed.variants[1].cfg.moe.expert_choice.capacity_factor = 1.5;  // ec: another config
  auto o = opts("reuse", false);
  o.reuse = src_json;
  std::ostringstream log;
  const auto done = run_compare(changed, o, log);
  EXPECT_NE(log.str().find("reuse: 2 finished runs taken"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("ec seed 1 not taken"), std::string::npos) << log.str();
  ASSERT_EQ(done["runs"].size(), 4u);
  for (const auto& r : done["runs"]) {
    const bool reused = r.contains("reused");
    EXPECT_EQ(reused, r["variant"] == "top2-switch") << r["variant"];
    if (!reused) continue;
    EXPECT_EQ(r["reused"]["keys_added"], nlohmann::json::array({"train.precision = 'fp32'"}));
    EXPECT_EQ(r["fingerprint"], run_fingerprint(changed.variants[0], r["seed"].get<int64_t>()));
    EXPECT_EQ(r["validation"]["loss"],
              src["runs"][r["seed"].get<int64_t>() == 1 ? 0 : 2]["validation"]["loss"]);
  }
  // A finished run of the folder itself, made before a key existed, is kept by a rerun too.
  const auto first = fs::path(o.out_dir) / "ec" / "seed1" / "run.json";
  auto run = read_json(first);
  run["fingerprint"] =
      std::regex_replace(run["fingerprint"].get<std::string>(), std::regex("precision = .*\n"), "");
  std::ofstream(first) << run.dump();
  std::ostringstream log_again;
  const auto again = run_compare(changed, o, log_again);
  EXPECT_EQ(log_again.str().find("== compare"), std::string::npos)
      << "nothing trains again: " << log_again.str();
  EXPECT_EQ(again["runs"][1]["keys_added_since"], nlohmann::json::array({"train.precision = 'fp32'"}));
  // A file that is not a comparison is named.
  std::ofstream(src_json) << "{\"runs\": 3}";
  auto o2 = opts("reuse_bad", false);
  o2.reuse = src_json;
  std::ostringstream log2;
  try {
    run_compare(changed, o2, log2);
    ADD_FAILURE() << "a file without runs was reused";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find(src_json), std::string::npos) << e.what();
  }
}

TEST(Compare, EveryRouterRunsAndIsMeasured) {
  // One variant per router, one seed, two steps: every router's scores, gap and leak can be measured.
  auto plan = load_compare_plan("", tiny_overrides("all", {"train.steps=2", "train.eval_every=0"}));
  resolve_compare_plan(plan, "", {1});
  ASSERT_EQ(plan.variants.size(), router_names().size());
  std::ostringstream log;
  const auto j = run_compare(plan, opts("all", false), log);
  ASSERT_EQ(j["runs"].size(), router_names().size());
  for (auto& r : j["runs"]) {
    SCOPED_TRACE(r["router"].get<std::string>());
    EXPECT_TRUE(std::isfinite(r["optimality_gap"]["gap"].get<double>()));
    EXPECT_TRUE(std::isfinite(r["causal_leak"]["train"].get<double>()));
    EXPECT_EQ(r["first_batch"], j["runs"][0]["first_batch"]);
  }
}

TEST(Compare, FaultInjectionScalesOneExpertsRows) {
  MoEConfig c;
  c.router = "topk";
  c.n_expert = 4;
  c.n_expert_used = 2;
  c.d_expert = 8;
  torch::manual_seed(3);
  MoELayer layer(c, 6);
  layer->eval();
  auto x = torch::randn({2, 5, 6});
  torch::NoGradGuard ng;
  const auto clean = layer->forward(x);
  // factor 1: the unfused path the fault takes gives the fused path's output (1e-5: float32 sums in
  // another order).
  layer->set_fault(1, 1.0);
  EXPECT_TRUE(torch::allclose(layer->forward(x).y, clean.y, 1e-5, 1e-5));
  // NaN: exactly the tokens routed to expert 1 become NaN.
  layer->set_fault(1, std::numeric_limits<double>::quiet_NaN());
  const auto bad = layer->forward(x);
  auto routed = torch::zeros({10}, torch::kBool);
  const auto off = bad.plan.offsets();
  routed.index_fill_(0, bad.plan.token_index.narrow(0, off[1], off[2] - off[1]), true);
  const auto nan_rows = bad.y.reshape({10, 6}).isnan().any(1);
  EXPECT_TRUE(torch::equal(nan_rows, routed));
  EXPECT_GT(routed.sum().item<int64_t>(), 0);
  layer->clear_fault();
  EXPECT_TRUE(torch::allclose(layer->forward(x).y, clean.y));
  EXPECT_THROW(layer->set_fault(4, 2.0), c10::Error);
}

TEST(Compare, FaultVariantTrainsThroughNaNSteps) {
  const char* toml = R"(
[[compare.variant]]
name = "nan-rel"
router = "hierarchical"
seeds = [1]
fault = { step = 2, expert = 1, factor = "nan" }
)";
  auto plan = load_compare_plan(write_toml("fault", toml), tiny_overrides("fault"));
  resolve_compare_plan(plan);
  EXPECT_EQ(plan.variants[0].cfg.train.nan_policy, "skip");  // set for fault variants
  EXPECT_EQ(plan.variants[0].group(), "fault");
  std::ostringstream log;
  // With plots: the run's own report reads a metrics file whose validation loss is NaN (written as null).
  const auto j = run_compare(plan, opts("fault", true), log);
  ASSERT_EQ(j["runs"].size(), 1u);
  const auto& r = j["runs"][0];
  EXPECT_EQ(r["fault"]["factor"], "nan");
  // The faulty expert makes steps non-finite from step 2 on until reliability steers tokens away: at least
  // the first faulty step is skipped, and the run still ends with its 6 steps counted.
  EXPECT_GT(r["skipped_steps"].get<int64_t>(), 0);
  EXPECT_EQ(r["steps"], 6);
}

TEST(Compare, SpreadAndTimeToBalance) {
  const auto s = spread_of({1.0, 2.0, 3.0, std::numeric_limits<double>::quiet_NaN()});
  EXPECT_EQ(s.n, 3);
  EXPECT_EQ(s.missing, 1);
  EXPECT_DOUBLE_EQ(s.mean, 2.0);
  EXPECT_DOUBLE_EQ(s.sd, 1.0);  // sample standard deviation: sqrt(2 / 2)
  EXPECT_TRUE(s.apart_from(spread_of({3.5, 4.0})));
  EXPECT_FALSE(s.apart_from(spread_of({3.0, 4.0})));  // touching ranges overlap
  // Dips under 0.2 at step 2 but rises again; stays under from step 4.
  EXPECT_EQ(time_to_balance({1, 2, 3, 4, 5}, {0.5, 0.1, 0.3, 0.15, 0.1}), 4);
  EXPECT_EQ(time_to_balance({1, 2}, {0.1, 0.5}), -1);
  EXPECT_EQ(time_to_balance({}, {}), -1);
  // Averaged over 2 steps: one lucky last batch is not balance; two low ones are.
  EXPECT_EQ(time_to_balance({1, 2, 3}, {0.5, 0.5, 0.1}, 0.2, 2), -1);
  EXPECT_EQ(time_to_balance({1, 2, 3, 4}, {0.5, 0.5, 0.1, 0.1}, 0.2, 2), 4);
}

// A synthetic compare.json: the report's verdicts follow the numbers, and overlapping spreads say so.
nlohmann::json synthetic_run(const std::string& variant, const std::string& role, int seed, double mvg,
                             double ppl) {
  nlohmann::json eval = {{"perplexity", ppl},
                         {"loss", std::log(ppl)},
                         {"max_vio_global", mvg},
                         {"specialization", 0.1},
                         {"dead_experts", 0},
                         {"assignments_per_token", 2.0},
                         {"layers", nlohmann::json::array()},
                         {"domains", nlohmann::json::array()}};
  return {{"variant", variant},
          {"role", role},
          {"group", "main"},
          {"seed", seed},
          {"router_label", variant},
          {"steps", 10},
          {"tokens_per_step", 100},
          {"curve", {{"step", {10}}, {"loss", {std::log(ppl)}}, {"max_vio_batch", {mvg}}}},
          {"load_steps", nlohmann::json::array()},
          {"max_vio_batch_mean", mvg},
          {"dropped_share_mean", 0.0},
          {"assignments_per_token_train", 2.0},
          {"time_to_balance", -1},
          {"validation", eval},
          {"heldout", eval},
          {"validation_curve", {{10, std::log(ppl)}}},
          {"optimality_gap", {{"gap", 0.01}, {"capacity_violation", 0.0}}},
          {"causal_leak", {{"eval", 0.0}, {"train", 0.0}}}};
}

// A synthetic variant: its validation perplexity and MaxVio_global on seeds 1, 2, 3.
struct Synthetic {
  std::string name, role;
  std::vector<double> ppl, mvg = {0.1, 0.1, 0.1};
};

// The report of synthetic variants; returns the claim section whose heading starts with `heading`.
std::string section_of(const std::vector<Synthetic>& variants, const std::string& heading) {
  nlohmann::json j = {{"command", "test"},
                      {"machine", "test"},
                      {"source", "test"},
                      {"seeds", {1, 2, 3}},
                      {"k", 2},
                      {"steps", 10},
                      {"batch_size", 1},
                      {"seq_len", 100},
                      {"complete", true},
                      {"variants", nlohmann::json::array()},
                      {"runs", nlohmann::json::array()}};
  for (auto& v : variants) {
    j["variants"].push_back({{"name", v.name},
                             {"role", v.role},
                             {"group", "main"},
                             {"router", "topk"},
                             {"overrides", nlohmann::json::array()},
                             {"equal_compute", "top-2"}});
    for (int s = 0; s < 3; ++s) {
      auto r = synthetic_run(v.name, v.role, s + 1, v.mvg[s], v.ppl[s]);
      r["mflop_per_token"] = 2.0;
      j["runs"].push_back(r);
    }
  }
  const auto dir = fs::path(::testing::TempDir()) / "moeforge_compare_sections";
  fs::create_directories(dir);
  std::ifstream in(write_compare_outputs(dir.string(), j, /*plots=*/false));
  std::stringstream ss;
  ss << in.rdbuf();
  const auto text = ss.str();
  const auto at = text.find("### " + heading);
  EXPECT_NE(at, std::string::npos) << text;
  return at == std::string::npos ? "" : text.substr(at, text.find("### ", at + 4) - at);
}

std::string claim_report(const std::vector<double>& lf_mvg, const std::vector<double>& bl_mvg) {
  return section_of({{"bl", "balance_loss", {50, 51, 52}, bl_mvg}, {"lf", "loss_free", {50, 51, 52}, lf_mvg}},
                    "1. Loss-free");
}

TEST(Compare, ClaimVerdictsFollowTheNumbers) {
  // Lower MaxVio_global on every seed (the paired interval excludes 0), the same perplexity on every seed
  // (the interval is [0, 0], inside the ±1% bound): reproduced.
  auto yes = claim_report({0.05, 0.06, 0.07}, {0.5, 0.6, 0.7});
  EXPECT_NE(yes.find("**reproduced**"), std::string::npos) << yes;
  EXPECT_NE(yes.find("lower, resolved"), std::string::npos) << yes;
  EXPECT_NE(yes.find("equivalent within ±1.0%"), std::string::npos) << yes;
  // Lower on average, but the per-seed differences (-0.2, -0.2, -0.05) give an interval that spans 0: not
  // resolved (the min-max rule called this "mixed").
  auto overlap = claim_report({0.3, 0.4, 0.65}, {0.5, 0.6, 0.7});
  EXPECT_NE(overlap.find("**not resolved**"), std::string::npos) << overlap;
  EXPECT_NE(overlap.find("the interval spans 0"), std::string::npos) << overlap;
  // Ranges that overlap but a per-seed difference that is the same on every seed: resolved by pairing,
  // where the min-max rule could not.
  auto paired = claim_report({0.45, 0.55, 0.65}, {0.5, 0.6, 0.7});
  EXPECT_NE(paired.find("**reproduced**"), std::string::npos) << paired;
  // Higher, resolved: not reproduced.
  auto no = claim_report({0.8, 0.9, 1.0}, {0.5, 0.6, 0.7});
  EXPECT_NE(no.find("**not reproduced**"), std::string::npos) << no;
}

// The report's baseline and MoCE-ablation sections on synthetic runs: a variant resolved better on every
// seed is named, one whose per-seed differences straddle 0 is not.
TEST(Compare, BaselineAndAblationVerdictsFollowThePairs) {
  const std::vector<double> moe = {50, 52, 54};
  // Dense at equal active parameters 2% worse on every seed; at equal total within noise around the MoE.
  auto b = section_of({{"bl", "balance_loss", moe},
                       {"dense-a", "dense_active", {51, 53.04, 55.08}},
                       {"dense-t", "dense_total", {49, 53, 53.9}}},
                      "0. Baselines");
  EXPECT_NE(b.find("better than dense at equal active parameters (resolved)"), std::string::npos) << b;
  EXPECT_NE(b.find("not resolved against dense at equal total parameters"), std::string::npos) << b;
  // MoCE 6% worse than the one router; one ablation recovers it on every seed, another does not move.
  auto a = section_of({{"bl", "balance_loss", moe},
                       {"moce", "moce", {53, 55.12, 57.24}},
                       {"moce-fix", "moce_ablation", {50.5, 52.5, 54.5}},
                       {"moce-same", "moce_ablation", {53.5, 54.5, 57.8}}},
                      "4b.");
  EXPECT_NE(a.find("**located in part: moce-fix resolve lower than moce**"), std::string::npos) << a;
  EXPECT_EQ(a.find("moce-same resolve"), std::string::npos) << a;
  // claims.json holds every paired test with its per-seed pairs (the last report written: the ablations').
  const auto claims = read_json(fs::path(::testing::TempDir()) / "moeforge_compare_sections" / "claims.json");
  bool found = false;
  for (auto& t : claims["tests"])
    if (t["test"] == "moce-fix − moce: validation perplexity") {
      found = true;
      ASSERT_EQ(t["pairs"].size(), 3u);
      EXPECT_EQ(t["pairs"][0]["seed"], 1);
      EXPECT_NEAR(t["pairs"][0]["x"].get<double>(), std::log(50.5), 1e-12);
      EXPECT_NEAR(t["pairs"][0]["ref"].get<double>(), std::log(53.0), 1e-12);
      EXPECT_LT(t["hi"].get<double>(), 0.0);
      EXPECT_TRUE(t.contains("holm_level"));
    }
  EXPECT_TRUE(found) << claims.dump(1);
}

TEST(Compare, EqualComputeRule) {
  const auto cfg = tiny_config("rule");  // E = 4, K = 2, 2 clusters
  std::string how;
  auto ec = equal_compute_config(cfg, "expert_choice", &how);
  EXPECT_EQ(ec.moe.expert_choice.capacity_factor, 2.0) << how;
  auto h = equal_compute_config(cfg, "hierarchical", &how);
  EXPECT_EQ(h.moe.hierarchical.n_cluster_used * h.moe.n_expert_used, 2) << how;
  EXPECT_EQ(h.moe.hierarchical.n_cluster_used, 1)
      << how;  // the fewest clusters: K_e = 2 fits in a cluster of 2
  auto h4 = equal_compute_config(tiny_config("rule", {"moe.n_expert_used=4"}), "hierarchical", &how);
  EXPECT_EQ(h4.moe.hierarchical.n_cluster_used, 2) << how;
  EXPECT_EQ(h4.moe.n_expert_used, 2) << how;
  auto m = equal_compute_config(cfg, "moce", &how);
  EXPECT_EQ(m.moe.n_expert_used, 2) << how;
  for (const char* r : {"topk", "loss_free", "bip"})
    EXPECT_EQ(equal_compute_config(cfg, r).moe.n_expert_used, 2);
  for (auto& r : router_names()) EXPECT_EQ(equal_compute_config(cfg, r).moe.router, r);
}

// Each bad plan names the key it got wrong.
void expect_config_error(const std::string& toml, const std::string& field, const std::string& only = "") {
  SCOPED_TRACE(toml);
  try {
    auto plan = load_compare_plan(write_toml("bad", toml), tiny_overrides("bad"));
    resolve_compare_plan(plan, only);
    ADD_FAILURE() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), field) << e.what();
  }
}

TEST(Compare, BadPlansAreNamed) {
  expect_config_error("[compare]\nnonsense = 1\n", "compare.nonsense");
  expect_config_error("[compare]\nseeds = [1, 1]\n", "compare.seeds");
  expect_config_error("[compare]\nequivalence_ppl = 2\n", "compare.equivalence_ppl");
  expect_config_error("[compare]\nequivalence_ppl = \"1%\"\n", "compare.equivalence_ppl");
  expect_config_error("[[compare.variant]]\nrouter = \"topk\"\n", "compare.variant.name");
  expect_config_error("[[compare.variant]]\nname = \"a\"\n", "compare.variant.router");
  expect_config_error("[[compare.variant]]\nname = \"a\"\nrouter = \"nonsense\"\n", "compare.variant.router");
  expect_config_error("[[compare.variant]]\nname = \"a/b\"\nrouter = \"topk\"\n", "compare.variant.name");
  expect_config_error(
      "[[compare.variant]]\nname = \"a\"\nrouter = \"topk\"\n[[compare.variant]]\nname = \"a\"\n"
      "router = \"bip\"\n",
      "compare.variant.name");
  expect_config_error("[[compare.variant]]\nname = \"a\"\nrouter = \"topk\"\ncolour = 1\n",
                      "compare.variant.colour");
  expect_config_error(
      "[[compare.variant]]\nname = \"a\"\nrouter = \"topk\"\nfault = { step = 1, factor = \"big\" }\n",
      "compare.variant.fault.factor");
  expect_config_error(
      "[[compare.variant]]\nname = \"a\"\nrouter = \"topk\"\nfault = { step = 1, expert = 9 }\n",
      "compare.variant.fault.expert");
  expect_config_error("[[compare.variant]]\nname = \"a\"\nrouter = \"topk\"\nset = [\"moe.nonsense=1\"]\n",
                      "moe.nonsense");
  expect_config_error(
      "[[compare.variant]]\nname = \"a\"\nrouter = \"hierarchical\"\nset = [\"moe.reliability=2\"]\n",
      "moe.reliability");
  expect_config_error("[[compare.variant]]\nname = \"a\"\nrouter = \"topk\"\n", "--variants", "b");
  EXPECT_THROW(parse_seed_list("1,x"), ConfigError);
  EXPECT_THROW(parse_seed_list("1,1"), ConfigError);
  EXPECT_EQ(parse_seed_list("3,1"), (std::vector<int64_t>{3, 1}));
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
