// Sparse upcycling: an MoE model built from a dense checkpoint computes exactly the dense function at the
// start (copied experts with gates summing to one; or adapters with W_up = 0 on the frozen dense FFN), and
// trains from there.
#include <unistd.h>

#include <filesystem>

#include "moeforge/model/checkpoint.h"
#include "moeforge/model/load.h"
#include "moeforge/model/upcycle.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

std::string temp(const std::string& name) {
  auto p = fs::path(::testing::TempDir()) / ("moeforge_upcycle_" + name);
  fs::remove_all(p);
  return p.string();
}

// Trains a tiny dense model (no MoE layers) and returns its checkpoint folder.
std::string dense_checkpoint() {
  static const std::string ckpt = [] {
    std::ostringstream log;
    auto cfg = load_run_config_text(
        "", "test", test::tiny_run_overrides("upcycle", {"model.moe_every=0", "train.steps=10"}));
    TrainOptions o;
    // Per process: ctest -j runs this suite's tests in parallel processes, each training its own.
    o.out_dir = temp("dense_" + std::to_string(::getpid()));
    o.progress = false;
    return train_model(cfg, o, log).checkpoint;
  }();
  return ckpt;
}

torch::Tensor logits(LoadedModel& lm, const torch::Tensor& tokens) {
  torch::NoGradGuard ng;
  return lm.model->forward(tokens).logits;
}

TEST(Upcycle, CopiedExpertsStartAsTheDenseModel) {
  auto dense = load_model(dense_checkpoint());
  UpcycleOptions opt;
  opt.dense_checkpoint = dense_checkpoint();
  opt.overrides = {"model.moe_every=1", "moe.n_expert=4", "moe.n_expert_used=2", "moe.d_expert=48"};
  opt.out_dir = temp("ffn");
  upcycle(opt);
  auto moe = load_model(opt.out_dir);
  ASSERT_EQ(moe.model->moe_layers().size(), 2u);
  auto tokens = torch::randint(0, dense.tokenizer->vocab_size(), {2, 12}, torch::kLong);
  // Identical experts and renormalised gates: y = sum_k g_k FFN(x) = FFN(x) up to float32 rounding of
  // the gate sum and the scatter-add (1e-5 relative).
  EXPECT_TENSOR_NEAR(logits(moe, tokens), logits(dense, tokens), 1e-4, 1e-5);
}

TEST(Upcycle, AdapterFormFreezesTheDenseFFN) {
  auto dense = load_model(dense_checkpoint());
  UpcycleOptions opt;
  opt.dense_checkpoint = dense_checkpoint();
  opt.overrides = {"model.moe_every=2", "moe.router=\"moce\"", "moe.n_cluster=2",
                   "moe.n_expert=4",    "moe.n_expert_used=1", "moe.expert_form=\"adapter\"",
                   "moe.d_expert=48",   "moe.adapter_dim=8"};
  opt.out_dir = temp("adapter");
  upcycle(opt);
  auto moe = load_model(opt.out_dir);
  auto tokens = torch::randint(0, dense.tokenizer->vocab_size(), {2, 12}, torch::kLong);
  // W_up = 0: every adapter adds exactly zero, so the function is the dense one (same float32 operations).
  EXPECT_TENSOR_NEAR(logits(moe, tokens), logits(dense, tokens), 1e-6, 1e-6);
  // Fine-tuning from it trains adapters and routers, never the frozen FFN.
  std::ostringstream log;
  auto cfg = load_run_config_text(load_checkpoint(opt.out_dir).config_toml, "upcycled", {"train.steps=3"});
  TrainOptions t;
  t.out_dir = temp("adapter_run");
  t.progress = false;
  t.init_from = opt.out_dir;
  auto s = train_model(cfg, t, log);
  auto tuned = load_model(s.checkpoint);
  auto before = module_state(*moe.model), after = module_state(*tuned.model);
  for (size_t i = 0; i < before.size(); ++i) {
    if (before[i].first.find(".moe.dense.") == std::string::npos) continue;
    EXPECT_TRUE(torch::equal(before[i].second, after[i].second)) << before[i].first << " changed";
  }
}

TEST(Upcycle, MismatchedWidthIsNamed) {
  UpcycleOptions opt;
  opt.dense_checkpoint = dense_checkpoint();
  opt.overrides = {"model.moe_every=1", "moe.d_expert=40"};
  opt.out_dir = temp("bad");
  try {
    upcycle(opt);
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "moe.d_expert") << e.what();
  }
}

}  // namespace
}  // namespace moeforge
