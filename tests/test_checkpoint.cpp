// Checkpoints: round trip, atomic replacement, and clear errors for corrupted, truncated and mismatched
// checkpoints.
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "moeforge/model/checkpoint.h"
#include "moeforge/model/transformer.h"
#include "moeforge/util/atomic_file.h"
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

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Rewrites `dir`'s manifest through `edit`.
void edit_manifest(const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
  auto m = nlohmann::json::parse(slurp(fs::path(dir) / "manifest.json"));
  edit(m);
  std::ofstream(fs::path(dir) / "manifest.json", std::ios::trunc) << m.dump(2);
}

// Expects load_checkpoint(dir) to throw FileError whose message holds every one of `words`.
void expect_load_error(const std::string& dir, const std::vector<std::string>& words) {
  try {
    load_checkpoint(dir);
    ADD_FAILURE() << "no error for " << dir;
  } catch (const FileError& e) {
    for (auto& w : words) EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
  }
}

TEST(CheckpointHostile, ManifestPathsCannotLeaveTheFolder) {
  auto model = tiny_model();
  const auto root = fresh_dir("escape");
  const auto dir = root + "/ckpt";
  save_checkpoint(dir, make_ckpt(model, 1));
  std::ofstream(root + "/secret") << "outside";
  const auto secret_crc = crc32_of("outside");
  for (std::string name : {"../secret", "/etc/passwd", "sub/model.safetensors", "manifest.json"}) {
    save_checkpoint(dir, make_ckpt(model, 1));
    edit_manifest(dir, [&](nlohmann::json& m) { m["files"][name] = {{"bytes", 7}, {"crc32", secret_crc}}; });
    expect_load_error(dir, {"manifest.json", name, "not part of a checkpoint"});
  }
  // `latest` may only name a folder beside it.
  save_checkpoint(dir, make_ckpt(model, 1));
  for (std::string target : {"../escape/ckpt", "/tmp", ".."}) {
    std::ofstream(root + "/latest", std::ios::trunc) << target << "\n";
    try {
      resolve_checkpoint_dir(root);
      ADD_FAILURE() << target;
    } catch (const FileError& e) {
      EXPECT_NE(std::string(e.what()).find("latest"), std::string::npos) << e.what();
    }
  }
  std::ofstream(root + "/latest", std::ios::trunc) << "ckpt\n";
  EXPECT_EQ(load_checkpoint(root).step, 1);
}

TEST(CheckpointHostile, FilesClaimingMoreDataThanTheyHaveAreErrors) {
  auto model = tiny_model();
  const auto dir = fresh_dir("claims") + "/ckpt";
  save_checkpoint(dir, make_ckpt(model, 1));
  // The manifest claims 4 GiB for the tokenizer: compared with the file's size before it is read.
  edit_manifest(dir, [](nlohmann::json& m) { m["files"]["tokenizer.model"]["bytes"] = 4294967296ull; });
  expect_load_error(dir, {"tokenizer.model", "4294967296", "truncated"});
  // A model file whose header claims a [262144, 262144] tensor, with a manifest that agrees with the file:
  // the safetensors checks name the file and the tensor, and nothing is allocated.
  save_checkpoint(dir, make_ckpt(model, 1));
  const std::string header = R"({"embedding":{"dtype":"F32","shape":[262144,262144],"data_offsets":[0,16]}})";
  std::string bytes;
  for (int i = 0; i < 8; ++i) bytes.push_back(char((uint64_t(header.size()) >> (8 * i)) & 0xff));
  bytes += header + std::string(16, '\0');
  std::ofstream(fs::path(dir) / "model.safetensors", std::ios::binary | std::ios::trunc) << bytes;
  edit_manifest(dir, [&](nlohmann::json& m) {
    m["files"]["model.safetensors"] = {{"bytes", bytes.size()}, {"crc32", crc32_of(bytes)}};
  });
  expect_load_error(dir, {"model.safetensors", "tensor 'embedding'", "274877906944 bytes expected"});
  // Wrong types in the manifest are named, not a JSON library exception.
  save_checkpoint(dir, make_ckpt(model, 1));
  edit_manifest(dir, [](nlohmann::json& m) { m["files"]["config.toml"]["bytes"] = "many"; });
  expect_load_error(dir, {"manifest.json", "config.toml", "bytes"});
  save_checkpoint(dir, make_ckpt(model, 1));
  edit_manifest(dir, [](nlohmann::json& m) { m["step"] = -3; });
  expect_load_error(dir, {"manifest.json", "step"});
  std::ofstream(fs::path(dir) / "manifest.json", std::ios::trunc) << "[1, 2";
  expect_load_error(dir, {"manifest.json", "not valid JSON"});
}

TEST(CheckpointHostile, VersionIsRecordedAndOlderFormatsAreNamed) {
  auto model = tiny_model();
  const auto dir = fresh_dir("version") + "/ckpt";
  save_checkpoint(dir, make_ckpt(model, 4));
  auto m = nlohmann::json::parse(slurp(fs::path(dir) / "manifest.json"));
  EXPECT_EQ(m.at("moeforge_version"), std::string(moeforge_version()));
  EXPECT_EQ(load_checkpoint(dir).writer, std::string("moeforge ") + moeforge_version());
  EXPECT_NE(slurp(fs::path(dir) / "config.toml").find("steps = 3"), std::string::npos);
  // A checkpoint from before versions were recorded (same format) still loads.
  edit_manifest(dir, [](nlohmann::json& m) { m.erase("moeforge_version"); });
  EXPECT_EQ(load_checkpoint(dir).step, 4);
  // Another format fails, naming the version that wrote it.
  edit_manifest(dir, [](nlohmann::json& m) {
    m["format"] = "moeforge-checkpoint-0";
    m["moeforge_version"] = "0.0.7";
  });
  expect_load_error(dir, {"moeforge-checkpoint-0", "moeforge 0.0.7", moeforge_version()});
}

// Runs `fn` in a forked child whose files may grow to `limit` bytes at most (RLIMIT_FSIZE, SIGXFSZ ignored
// so a write past it fails with EFBIG, as a full disk fails with ENOSPC). Tests run as root, which a
// read-only folder does not stop; the file size limit holds for root too. Returns the child's exit code.
int with_file_size_limit(rlim_t limit, const std::function<int()>& fn) {
  const pid_t pid = fork();
  if (pid == 0) {
    signal(SIGXFSZ, SIG_IGN);
    rlimit rl{limit, limit};
    if (setrlimit(RLIMIT_FSIZE, &rl) != 0) _exit(90);
    int rc = 91;
    try {
      rc = fn();
    } catch (...) {
      rc = 92;
    }
    _exit(rc);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool has_temporaries(const fs::path& folder) {
  for (auto& e : fs::directory_iterator(folder)) {
    const auto n = e.path().filename().string();
    if (n.find(".tmp") != std::string::npos || n.find(".old-") != std::string::npos) return true;
  }
  return false;
}

TEST(CheckpointFaults, FullDiskKeepsThePreviousCheckpoint) {
  auto model = tiny_model(64);
  const auto root = fresh_dir("full");
  const auto dir = root + "/ckpt";
  save_checkpoint(dir, make_ckpt(model, 1));
  const auto before = slurp(fs::path(dir) / "model.safetensors");
  ASSERT_GT(before.size(), 8192u);
  const int rc = with_file_size_limit(4096, [&] {
    try {
      save_checkpoint(dir, make_ckpt(model, 2));
      return 1;  // the write should have failed
    } catch (const FileError& e) {
      const std::string w = e.what();
      // The checkpoint's path, the file that failed, and why.
      if (w.rfind(dir, 0) != 0 || w.find("model.safetensors") == std::string::npos ||
          w.find("File too large") == std::string::npos ||
          w.find("already in this folder is kept") == std::string::npos)
        return 2;
      return 0;
    }
  });
  EXPECT_EQ(rc, 0) << "1: no error; 2: the error did not name the path and the reason";
  auto c = load_checkpoint(dir);
  EXPECT_EQ(c.step, 1);
  EXPECT_EQ(slurp(fs::path(dir) / "model.safetensors"), before);
  EXPECT_FALSE(has_temporaries(root));
}

TEST(CheckpointFaults, AtomicFileWriteFailureKeepsTheOldContent) {
  const auto root = fresh_dir("atomicfile");
  fs::create_directories(root);
  const auto path = root + "/latest";
  write_file_atomic(path, "step-000001\n");
  const int rc = with_file_size_limit(16, [&] {
    try {
      write_file_atomic(path, std::string(1000, 'x'));
      return 1;
    } catch (const FileError& e) {
      return e.path() == path && std::string(e.what()).find("file size limit") != std::string::npos ? 0 : 2;
    }
  });
  EXPECT_EQ(rc, 0) << "1: no error; 2: the error did not name the path and the reason";
  EXPECT_EQ(slurp(path), "step-000001\n");
  EXPECT_FALSE(has_temporaries(root));
  // An unwritable place: a folder that does not exist.
  try {
    write_file_atomic(root + "/no/such/folder/file", "x");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), root + "/no/such/folder/file");
    EXPECT_NE(std::string(e.what()).find("cannot open"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moeforge
