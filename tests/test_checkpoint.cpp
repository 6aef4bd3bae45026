// Checkpoints: round trip, atomic replacement, and clear errors for corrupted, truncated and mismatched
// checkpoints.
#include <filesystem>
#include <fstream>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "moeforge/model/checkpoint.h"
#include "moeforge/model/transformer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

TransformerLM tiny_model(int64_t d_model = 16) {
  ModelConfig m;
  m.vocab_size = 11;
  m.d_model = d_model;
  m.n_head = 2;
  m.n_layer = 2;
  m.d_ff = 12;
  m.max_seq_len = 8;
  MoEConfig moe;
  moe.n_expert = 4;
  moe.d_expert = 6;
  return TransformerLM(m, moe);
}

Checkpoint make_ckpt(TransformerLM& model, int64_t step) {
  Checkpoint c;
  c.step = step;
  c.config_toml = "[train]\nsteps = 3\n";
  c.tokenizer_model = "not-a-real-tokenizer";
  c.model = module_state(*model);
  c.trainer = {{"rng.cpu", torch::arange(4, torch::kLong)}};
  c.trainer_meta = {{"batcher_epoch", "0"}};
  return c;
}

std::string fresh_dir(const std::string& name) {
  auto d = fs::path(::testing::TempDir()) / ("moeforge_ckpt_" + name);
  fs::remove_all(d);
  return d.string();
}

TEST(Checkpoint, RoundTripRestoresEveryTensor) {
  torch::manual_seed(1);
  auto a = tiny_model();
  const auto dir = fresh_dir("rt") + "/step-1";
  save_checkpoint(dir, make_ckpt(a, 1));
  auto c = load_checkpoint(dir);
  EXPECT_EQ(c.step, 1);
  EXPECT_EQ(c.trainer_meta.at("batcher_epoch"), "0");
  torch::manual_seed(2);
  auto b = tiny_model();
  load_module_state(*b, c.model, dir);
  auto sa = module_state(*a), sb = module_state(*b);
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) EXPECT_TRUE(torch::equal(sa[i].second, sb[i].second)) << sa[i].first;
}

TEST(Checkpoint, CrashMidWriteLeavesThePreviousCheckpointLoadable) {
  auto model = tiny_model();
  const auto dir = fresh_dir("atomic") + "/ckpt";
  save_checkpoint(dir, make_ckpt(model, 1));
  // A writer killed mid-write leaves only its temporary folder behind: simulate one, half written.
  const fs::path tmp = dir + ".tmp-999999";
  fs::create_directories(tmp);
  std::ofstream(tmp / "model.safetensors") << "partial";
  auto c = load_checkpoint(dir);
  EXPECT_EQ(c.step, 1);
  // A real second save replaces it completely.
  save_checkpoint(dir, make_ckpt(model, 2));
  EXPECT_EQ(load_checkpoint(dir).step, 2);
}

TEST(Checkpoint, KilledWriterProcessLeavesPreviousCheckpoint) {
  auto model = tiny_model(64);
  const auto dir = fresh_dir("kill") + "/ckpt";
  save_checkpoint(dir, make_ckpt(model, 1));
  // Fork a writer and kill it while it writes; whatever moment it dies at, `dir` must stay loadable.
  for (int delay_us : {0, 200, 2000}) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      for (;;) save_checkpoint(dir, make_ckpt(model, 2));
    }
    usleep(delay_us + 1000);
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    auto c = load_checkpoint(dir);
    EXPECT_TRUE(c.step == 1 || c.step == 2);
  }
}

TEST(Checkpoint, CorruptedAndTruncatedFilesAreNamed) {
  auto model = tiny_model();
  const auto dir = fresh_dir("corrupt") + "/ckpt";
  save_checkpoint(dir, make_ckpt(model, 1));
  const auto file = fs::path(dir) / "model.safetensors";
  const auto size = fs::file_size(file);
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(std::streamoff(size / 2));
    f.put('\x7f');
  }
  try {
    load_checkpoint(dir);
    ADD_FAILURE() << "no error for a corrupted file";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
  }
  fs::resize_file(file, size / 3);
  try {
    load_checkpoint(dir);
    ADD_FAILURE() << "no error for a truncated file";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_checkpoint(fresh_dir("none")), FileError);
}

TEST(Checkpoint, WrongShapeOrMissingTensorIsNamed) {
  auto small = tiny_model(16);
  auto big = tiny_model(32);
  auto state = module_state(*small);
  try {
    load_module_state(*big, state, "ckpt");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("shape"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("embedding"), std::string::npos) << e.what();
  }
  state.erase(state.begin());  // the embedding
  auto other = tiny_model(16);
  try {
    load_module_state(*other, state, "ckpt");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("'embedding' is missing"), std::string::npos) << e.what();
  }
  auto wrong_dtype = module_state(*small);
  wrong_dtype[0].second = wrong_dtype[0].second.to(torch::kDouble);
  try {
    load_module_state(*other, wrong_dtype, "ckpt");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("dtype"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moeforge
