// End-to-end training on a tiny generated text corpus: the loss falls, a resumed run continues exactly,
// the NaN guard stops or skips, and bad input (config, corpus) gives errors that name the thing.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "moeforge/experiments/compare.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/load.h"
#include "moeforge/train/optim.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

RunConfig tiny_config(const std::string& name, std::vector<std::string> extra = {}) {
  return load_run_config_text("", "test", test::tiny_run_overrides(name, extra));
}

TrainOptions opts(const std::string& name) {
  TrainOptions t;
  t.out_dir = (fs::path(::testing::TempDir()) / ("moeforge_run_" + name)).string();
  fs::remove_all(t.out_dir);
  t.progress = false;
  return t;
}

double mean(const std::vector<double>& v, size_t from, size_t n) {
  double s = 0;
  for (size_t i = from; i < from + n; ++i) s += v[i];
  return s / double(n);
}

// train.schedule: after the same warm-up, cosine decays over the whole run, constant stays at lr, and
// warmup-stable-decay stays at lr until the last decay_fraction of the steps, then falls linearly to the
// floor at the last step.
TEST(Trainer, LearningRateSchedules) {
  TrainConfig c;
  c.steps = 100;
  c.warmup = 10;
  c.lr = 1.0;
  c.min_lr_ratio = 0.1;
  for (const char* s : {"cosine", "constant", "wsd"}) {
    c.schedule = s;
    EXPECT_DOUBLE_EQ(learning_rate(c, 0), 0.1) << s;  // warm-up: (step + 1) / warmup
    EXPECT_DOUBLE_EQ(learning_rate(c, 9), 1.0) << s;
  }
  c.schedule = "cosine";
  EXPECT_NEAR(learning_rate(c, 55), 0.55, 1e-12);  // half-way: the mean of lr and the floor
  c.schedule = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(c, 99), 1.0);
  c.schedule = "wsd";
  c.decay_fraction = 0.2;  // steps 80..99 decay
  EXPECT_DOUBLE_EQ(learning_rate(c, 79), 1.0);
  EXPECT_NEAR(learning_rate(c, 89), 1.0 - 0.9 * 10.0 / 20.0, 1e-12);
  EXPECT_NEAR(learning_rate(c, 99), 0.1, 1e-12);
  c.decay_fraction = 1.0;  // the decay never starts inside the warm-up
  EXPECT_DOUBLE_EQ(learning_rate(c, 9), 1.0);
  EXPECT_NEAR(learning_rate(c, 99), 0.1, 1e-12);
  c.schedule = "linear";
  test::expect_config_error([&] { c.validate(); }, "train.schedule");
  c.schedule = "wsd";
  c.decay_fraction = 0;
  test::expect_config_error([&] { c.validate(); }, "train.decay_fraction");
}

TEST(Trainer, LossFallsAndMetricsAreWritten) {
  std::ostringstream log;
  const auto o = opts("falls");
  auto s = train_model(tiny_config("falls"), o, log);
  ASSERT_EQ(s.step_losses.size(), 40u);
  // From ~ln(128) = 4.9 at the start; the templated text is learnable, so the last steps are well below.
  EXPECT_LT(mean(s.step_losses, 35, 5), mean(s.step_losses, 0, 5) - 1.0) << log.str();
  ASSERT_TRUE(s.validation.has_value());
  EXPECT_LT(s.validation->loss, s.step_losses.front());
  EXPECT_TRUE(fs::exists(fs::path(s.checkpoint) / "manifest.json"));
  // metrics.jsonl: one JSON object per line with step, split and loss.
  std::ifstream metrics(fs::path(o.out_dir) / "metrics.jsonl");
  int train_lines = 0, validation_lines = 0;
  for (std::string line; std::getline(metrics, line);) {
    auto j = nlohmann::json::parse(line);
    ASSERT_TRUE(j.contains("step") && j.contains("split") && j.contains("loss")) << line;
    train_lines += j["split"] == "train";
    validation_lines += j["split"] == "validation";
  }
  EXPECT_EQ(train_lines, 8);  // every 5 of 40 steps
  EXPECT_EQ(validation_lines, 1);
}

TEST(Trainer, ResumeContinuesExactly) {
  std::ostringstream log;
  auto cfg =
      tiny_config("resume", {"train.steps=8", "moe.noisy=true"});  // noise: the RNG state must resume too
  auto straight = train_model(cfg, opts("straight"), log);
  auto o = opts("halves");
  o.stop_after = 4;
  auto first = train_model(cfg, o, log);
  ASSERT_EQ(first.step, 4);
  auto o2 = o;
  o2.stop_after = 0;
  o2.resume = (fs::path(o.out_dir) / "checkpoints").string();
  auto second = train_model(cfg, o2, log);
  ASSERT_EQ(second.step, 8);
  std::vector<double> joined = first.step_losses;
  joined.insert(joined.end(), second.step_losses.begin(), second.step_losses.end());
  ASSERT_EQ(joined.size(), straight.step_losses.size());
  // Same data order, RNG, router and optimiser state, same single-threaded CPU arithmetic: bit-identical.
  for (size_t i = 0; i < joined.size(); ++i)
    EXPECT_EQ(joined[i], straight.step_losses[i]) << "step " << i + 1;
}

// The stateful routers' buffers of a trained checkpoint, by name.
std::map<std::string, torch::Tensor> router_buffers(const std::string& checkpoint) {
  std::map<std::string, torch::Tensor> m;
  auto lm = load_model(checkpoint);
  for (auto& b : lm.model->named_buffers())
    if (b.key().find(".router.") != std::string::npos) m[b.key()] = b.value().to(torch::kDouble);
  return m;
}

// Gradient accumulation (docs/routing.md, "State updates"): 2 micro-batches of 4 sequences leave the router
// state of 2 x B = 8 in one batch. Before the fix, only the last micro-batch reached after_step.
TEST(Trainer, GradAccumulationUpdatesRouterStateAsTheWholeBatch) {
  for (const char* router : {"loss_free", "bip"}) {
    SCOPED_TRACE(router);
    std::ostringstream log;
    const std::string r = std::string("moe.router=") + router;
    auto split = train_model(
        tiny_config(std::string("acc_") + router, {r, "train.steps=2", "train.batch_size=4",
                                                   "train.grad_accum=2", "moe.bias_update_rate=0.01"}),
        opts(std::string("acc_split_") + router), log);
    auto whole = train_model(
        tiny_config(std::string("acc_") + router, {r, "train.steps=2", "train.batch_size=8",
                                                   "train.grad_accum=1", "moe.bias_update_rate=0.01"}),
        opts(std::string("acc_whole_") + router), log);
    auto a = router_buffers(split.checkpoint), b = router_buffers(whole.checkpoint);
    ASSERT_EQ(a.size(), b.size());
    for (auto& [name, t] : b) {
      // Same tokens, same routing; the step-2 weights differ only by float summation order (~1e-7).
      EXPECT_TENSOR_NEAR(a[name], t, 1e-5, 1e-4) << name;
    }
    ASSERT_EQ(split.step_losses.size(), whole.step_losses.size());
    for (size_t i = 0; i < whole.step_losses.size(); ++i)
      EXPECT_NEAR(split.step_losses[i], whole.step_losses[i], 1e-4) << "step " << i + 1;
  }
}

// A resumed run with gradient accumulation and a stateful router continues exactly.
TEST(Trainer, ResumeWithAccumulationContinuesExactly) {
  std::ostringstream log;
  auto cfg = tiny_config("resume_acc", {"train.steps=6", "train.grad_accum=2", "moe.router=loss_free",
                                        "moe.bias_update_rate=0.01"});
  auto straight = train_model(cfg, opts("acc_straight"), log);
  auto o = opts("acc_halves");
  o.stop_after = 3;
  auto first = train_model(cfg, o, log);
  auto o2 = o;
  o2.stop_after = 0;
  o2.resume = (fs::path(o.out_dir) / "checkpoints").string();
  auto second = train_model(cfg, o2, log);
  std::vector<double> joined = first.step_losses;
  joined.insert(joined.end(), second.step_losses.begin(), second.step_losses.end());
  ASSERT_EQ(joined.size(), straight.step_losses.size());
  for (size_t i = 0; i < joined.size(); ++i)
    EXPECT_EQ(joined[i], straight.step_losses[i]) << "step " << i + 1;
  auto a = router_buffers(second.checkpoint), b = router_buffers(straight.checkpoint);
  for (auto& [name, t] : b) EXPECT_TRUE(torch::equal(a[name], t)) << name;
}

TEST(Trainer, NonFiniteLossStopsOrSkips) {
  std::ostringstream log;
  // An absurd learning rate blows the weights up after the first update.
  auto cfg = tiny_config("nan", {"train.lr=1e30", "train.warmup=0", "train.steps=6", "train.grad_clip=0.0"});
  try {
    train_model(cfg, opts("nan_stop"), log);
    ADD_FAILURE() << "no error for a non-finite loss";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
  }
  cfg.train.nan_policy = "skip";
  auto s = train_model(cfg, opts("nan_skip"), log);
  EXPECT_GT(s.skipped_steps, 0);
}

TEST(Trainer, MissingCorpusAndBadConfigAreNamed) {
  std::ostringstream log;
  auto cfg = tiny_config("missing", {"data.corpus=\"text:/nonexistent/moeforge-corpus\""});
  try {
    train_model(cfg, opts("missing"), log);
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/moeforge-corpus"), std::string::npos) << e.what();
  }
  try {
    load_run_config_text("[train]\nstepz = 3\n", "bad.toml");
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "train.stepz");
  }
  EXPECT_THROW(load_run_config_text("[train]\nbatch_size = 0\n", "bad.toml"), ConfigError);
  EXPECT_THROW(load_run_config_text("", "x", {"moe.n_expert_used=99"}), ConfigError);
  // The embedded default is valid.
  EXPECT_NO_THROW(load_run_config(""));
}

// A checkpoint whose config.toml describes a far larger model than its model file holds (CRCs fixed, as a
// hostile file would have them) is refused before the model is built, by eval/generate (load_model) and by
// train --resume; a sequence length that would make the RoPE table huge is a config error.
TEST(TrainerHostile, ConfigLargerThanItsModelFileIsRefusedBeforeAnythingIsAllocated) {
  std::ostringstream log;
  auto o = opts("hostile_cfg");
  auto s = train_model(tiny_config("hostile_cfg", {"train.steps=2"}), o, log);
  auto ck = load_checkpoint(s.checkpoint);
  auto cfg =
      load_run_config_text(ck.config_toml, "ckpt",
                           {"model.d_model=65536", "model.n_head=1", "model.n_layer=1000", "train.steps=4"});
  ck.config_toml = cfg.to_toml();
  const auto dir = (fs::path(o.out_dir) / "hostile").string();
  save_checkpoint(dir, ck);
  try {
    load_model(dir);
    ADD_FAILURE() << "a config of 10^13 parameters was built";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find(dir), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("describes a model of at least"), std::string::npos) << e.what();
  }
  auto o2 = opts("hostile_cfg_resume");
  o2.resume = dir;
  EXPECT_THROW(train_model(RunConfig{}, o2, log), FileError);
  // The same checkpoint with its own config loads.
  EXPECT_NO_THROW(load_model(s.checkpoint));
  test::expect_config_error([&] { load_run_config_text("", "x", {"data.seq_len=1073741824"}); },
                            "data.seq_len");
}

// The lower bound never refuses a real model: every committed config and the expert forms, sharing and
// splitting it knows of.
TEST(TrainerHostile, ParameterLowerBoundHoldsForRealModels) {
  std::vector<RunConfig> configs = {
      load_run_config(std::string(MOEFORGE_SOURCE_DIR) + "/configs/default.toml")};
  // Every variant of the committed comparison (each router at the comparison's size).
  auto plan = load_compare_plan(std::string(MOEFORGE_SOURCE_DIR) + "/configs/compare.toml", {});
  resolve_compare_plan(plan);
  for (const auto& v : plan.variants) configs.push_back(v.cfg);
  for (std::vector<std::string> extra : {std::vector<std::string>{"moe.expert_form=\"adapter\""},
                                         {"model.tie_embeddings=false", "model.moe_every=2"},
                                         {"moe.expert_split=2", "moe.n_shared_expert=1"},
                                         {"moe.router=\"hierarchical\"", "moe.n_cluster=2"},
                                         {"moe.router=\"moce\"", "moe.n_cluster=2"},
                                         {"model.moe_every=0"}})
    configs.push_back(tiny_config("bound", extra));
  for (auto& cfg : configs) {
    const int64_t vocab = cfg.data.vocab_size;
    auto model = build_model(cfg, vocab);
    EXPECT_NO_THROW(check_config_fits_model_file(cfg, vocab, module_state(*model), "x")) << cfg.to_toml();
  }
}

// (step, split) of every row of a run's metrics.jsonl, in order.
std::vector<std::pair<int64_t, std::string>> metric_rows(const std::string& out_dir) {
  std::ifstream in(fs::path(out_dir) / "metrics.jsonl");
  std::vector<std::pair<int64_t, std::string>> rows;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    rows.push_back({j.at("step").get<int64_t>(), j.at("split").get<std::string>()});
  }
  return rows;
}

TEST(TrainerResume, SetChangesStepsAndCadenceOnlyAndMetricsHaveOneRowPerStep) {
  std::ostringstream log;
  auto cfg = tiny_config("resume_set", {"train.steps=6", "train.log_every=1"});
  auto o = opts("resume_set");
  auto first = train_model(cfg, o, log);
  ASSERT_EQ(first.step, 6);
  auto o2 = o;
  o2.resume = (fs::path(o.out_dir) / "checkpoints").string();
  // Nothing left to do at train.steps = 6: an error saying how to go on, not a silent no-op.
  test::expect_config_error([&] { train_model(cfg, o2, log); }, "train.steps");
  // Keys that change what the checkpoint means are refused by name.
  o2.resume_overrides = {"model.d_model=64"};
  test::expect_config_error([&] { train_model(cfg, o2, log); }, "model.d_model");
  o2.resume_overrides = {"train.lr=1.0"};
  test::expect_config_error([&] { train_model(cfg, o2, log); }, "train.lr");
  o2.resume_overrides = {"train.steps=9", "train.log_every=1", "train.eval_every=0"};
  auto second = train_model(cfg, o2, log);
  EXPECT_EQ(second.step, 9);
  EXPECT_EQ(second.step_losses.size(), 3u);
  std::vector<std::pair<int64_t, std::string>> expect;
  for (int64_t s = 1; s <= 6; ++s) expect.push_back({s, "train"});
  expect.push_back({6, "validation"});
  for (int64_t s = 7; s <= 9; ++s) expect.push_back({s, "train"});
  expect.push_back({9, "validation"});
  EXPECT_EQ(metric_rows(o.out_dir), expect);
}

TEST(TrainerResume, RowsPastTheCheckpointAreDroppedOnResume) {
  std::ostringstream log;
  // Checkpoints at 3 and 6; the run goes on to 8 and then (as if killed) is resumed from step 3.
  auto cfg = tiny_config("resume_trunc", {"train.steps=8", "train.log_every=1", "train.checkpoint_every=3",
                                          "train.keep_checkpoints=3"});
  auto o = opts("resume_trunc");
  auto straight = train_model(cfg, o, log);
  ASSERT_TRUE(fs::exists(fs::path(o.out_dir) / "checkpoints" / "step-000003" / "manifest.json"));
  // A torn last line, as a writer killed mid-line leaves.
  std::ofstream(fs::path(o.out_dir) / "metrics.jsonl", std::ios::app) << "{\"step\": 9, \"spl";
  auto o2 = o;
  o2.resume = (fs::path(o.out_dir) / "checkpoints" / "step-000003").string();
  auto second = train_model(cfg, o2, log);
  EXPECT_EQ(second.step, 8);
  std::vector<std::pair<int64_t, std::string>> expect;
  for (int64_t s = 1; s <= 8; ++s) expect.push_back({s, "train"});
  expect.push_back({8, "validation"});
  EXPECT_EQ(metric_rows(o.out_dir), expect);
  // And the resumed steps are the straight run's.
  ASSERT_EQ(second.step_losses.size(), 5u);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(second.step_losses[i], straight.step_losses[i + 3]) << i;
}

TEST(TrainerResume, DefaultCheckpointsAtEveryEvaluation) {
  std::ostringstream log;
  auto cfg = tiny_config("ckpt_eval", {"train.steps=6", "train.eval_every=2", "train.keep_checkpoints=5"});
  EXPECT_EQ(cfg.train.checkpoint_every, -1);
  auto o = opts("ckpt_eval");
  train_model(cfg, o, log);
  for (const char* s : {"step-000002", "step-000004", "step-000006"})
    EXPECT_TRUE(fs::exists(fs::path(o.out_dir) / "checkpoints" / s / "manifest.json")) << s;
}

TEST(TrainerBadData, UnseenCharactersEmptyDocumentsHugeLinesAndNonUtf8Train) {
  // The tiny corpus plus hostile documents (docs/reliability.md, "bad training data").
  const auto root = fs::path(::testing::TempDir()) / "moeforge_bad_corpus";
  fs::remove_all(root);
  fs::copy(test::tiny_text_corpus(), root, fs::copy_options::recursive);
  std::ofstream(root / "animals" / "empty.txt");  // an empty document
  std::ofstream(root / "tools" / "blank.txt") << "\n\n   \n";
  {
    // One 1 MB line with no newline: words, then 200 kB of a two-byte character without any space (cut
    // into training pieces mid-word, possibly mid-character).
    std::ofstream out(root / "tools" / "huge.txt", std::ios::binary);
    for (int i = 0; i < 100000; ++i) out << "the saw cuts ";
    for (int i = 0; i < 100000; ++i) out << "\xc3\xa9";
  }
  {
    // Invalid UTF-8: stray continuation bytes, a truncated sequence, 0xff / 0xfe, an overlong NUL, a NUL.
    std::ofstream out(root / "animals" / "bytes.txt", std::ios::binary);
    for (int i = 0; i < 50; ++i)
      out << "the cat \x80\xbf sees \xff\xfe the dog \xe2\x82 . \xc0\x80 " << std::string(1, '\0') << " ";
  }
  std::ostringstream log;
  auto cfg = tiny_config("bad_data", {"train.steps=4", "data.corpus=\"text:" + root.string() + "\""});
  auto o = opts("bad_data");
  auto s = train_model(cfg, o, log);
  EXPECT_EQ(s.step, 4);
  for (double l : s.step_losses) EXPECT_TRUE(std::isfinite(l));
  // Characters the tokenizer never saw become <unk> (id 0 in SentencePiece's default layout) and decode
  // back without error.
  auto lm = load_model(s.checkpoint);
  auto ids = lm.tokenizer->encode("the cat \xe7\x8c\xab \xf0\x9f\x90\x88 \xff");
  EXPECT_FALSE(ids.empty());
  EXPECT_NE(std::find(ids.begin(), ids.end(), 0), ids.end());
  EXPECT_NO_THROW(lm.tokenizer->decode(ids));
}

}  // namespace
}  // namespace moeforge
