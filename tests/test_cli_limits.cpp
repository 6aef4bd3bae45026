// Shared run folders and input limits, driven through the built CLI as a user meets them
// (docs/reliability.md, "Shared folders and limits"): one process per run folder, nothing overwritten
// without being told, bounded memory and threads whatever the input, and messages that name the key, the
// file or the value.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "moeforge/config/run_config.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/util/runtime.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

struct Result {
  int code = -1;  // exit code, or 128 + signal if killed
  std::string out, err;
  long max_rss_kb = 0;  // the process's peak resident set
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Starts the built CLI with `args` in `dir` (its working folder), stdout and stderr to files there.
pid_t spawn(const std::vector<std::string>& args, const fs::path& dir,
            rlim_t file_size_limit = RLIM_INFINITY) {
  const pid_t pid = fork();
  if (pid == 0) {
    if (::chdir(dir.c_str()) != 0) _exit(126);
    const int out = ::open("stdout", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = ::open("stderr", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(out, 1);
    ::dup2(err, 2);
    if (file_size_limit != RLIM_INFINITY) {
      signal(SIGXFSZ, SIG_IGN);  // a write past the limit fails with EFBIG, as a full disk fails with ENOSPC
      rlimit rl{file_size_limit, file_size_limit};
      if (setrlimit(RLIMIT_FSIZE, &rl) != 0) _exit(125);
    }
    std::vector<char*> argv;
    static std::string cli = MOEFORGE_CLI;
    argv.push_back(cli.data());
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(cli.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

Result wait_for(pid_t pid, const fs::path& dir) {
  int status = 0;
  rusage ru{};
  ::wait4(pid, &status, 0, &ru);
  Result r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(dir / "stdout");
  r.err = slurp(dir / "stderr");
  r.max_rss_kb = ru.ru_maxrss;
  return r;
}

Result run(const std::vector<std::string>& args, const fs::path& dir,
           rlim_t file_size_limit = RLIM_INFINITY) {
  return wait_for(spawn(args, dir, file_size_limit), dir);
}

fs::path fresh(const std::string& name) {
  const auto d = fs::path(::testing::TempDir()) / ("moeforge_limits_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// The tests' tiny model as a config file in `dir`.
std::string tiny_config_file(const fs::path& dir, const std::string& name,
                             const std::vector<std::string>& extra) {
  const auto cfg = load_run_config_text("", "test", test::tiny_run_overrides(name, extra));
  const auto path = dir / (name + ".toml");
  std::ofstream(path) << cfg.to_toml();
  return path.string();
}

std::vector<std::string> train(const fs::path& dir, const std::string& name, const fs::path& out,
                               const std::vector<std::string>& config_extra,
                               const std::vector<std::string>& args_extra = {}) {
  std::vector<std::string> a = {"train", "--config",   tiny_config_file(dir, name, config_extra),
                                "--out", out.string(), "--no-report"};
  a.insert(a.end(), args_extra.begin(), args_extra.end());
  return a;
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// No C++ stack trace in what a user reads (LibTorch appends one to its own errors).
bool has_stack_trace(const std::string& s) {
  return contains(s, "frame #") || contains(s, "Exception raised from");
}

// 1. Two runs with the same --out: the second is refused, naming the first's pid, and writes nothing.
TEST(RunFolder, SecondRunOnABusyFolderIsRefusedNamingTheHolder) {
  const auto d = fresh("busy");
  const auto out = d / "run";
  const pid_t first = spawn(train(d, "busy", out, {"train.steps=100000", "train.log_every=1"}), d);
  // Wait (ctest's TIMEOUT guards a hang) until the first run has logged a step: it holds the folder.
  while (!fs::exists(out / "metrics.jsonl") || slurp(out / "metrics.jsonl").empty()) {
    int status = 0;
    ASSERT_EQ(::waitpid(first, &status, WNOHANG), 0) << "the first run ended early:\n" << slurp(d / "stderr");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const auto second_dir = d / "second";
  fs::create_directories(second_dir);
  auto r = run(train(d, "busy2", out, {"train.steps=5", "train.seed=2"}), second_dir);
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.err, "in use by another run (process " + std::to_string(first))) << r.err;
  ::kill(first, SIGTERM);
  auto r1 = wait_for(first, d);
  EXPECT_EQ(r1.code, 128 + SIGTERM) << r1.err;
  // Every metrics line is JSON of the first run (nothing interleaved by the second).
  std::ifstream in(out / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    bool json = true;
    try {
      auto row = nlohmann::json::parse(line);
      json = row.is_object();
    } catch (const nlohmann::json::exception&) {
      json = false;
    }
    EXPECT_TRUE(json) << line;
  }
}

// 2. A fresh run into a finished run's folder is refused; --overwrite replaces it; --resume continues it,
// without --out into the run it resumes.
TEST(RunFolder, AFinishedRunIsNeverOverwrittenSilently) {
  const auto d = fresh("finished");
  const auto out = d / "run";
  ASSERT_EQ(run(train(d, "finished", out, {"train.steps=4", "train.eval_every=2"}), d).code, 0);
  const std::string metrics = slurp(out / "metrics.jsonl");
  auto r = run(train(d, "finished", out, {"train.steps=3"}), d);
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.err, "holds an earlier run")) << r.err;
  EXPECT_TRUE(contains(r.err, "--overwrite")) << r.err;
  EXPECT_EQ(slurp(out / "metrics.jsonl"), metrics) << "the earlier run's metrics changed";
  EXPECT_EQ(slurp(out / "checkpoints" / "latest"), "step-000004\n");
  // --resume without --out continues in the run of the checkpoint, not in ./runs/default.
  auto resumed =
      run({"train", "--resume", (out / "checkpoints").string(), "--set", "train.steps=6", "--no-report"}, d);
  ASSERT_EQ(resumed.code, 0) << resumed.err;
  EXPECT_TRUE(contains(resumed.out, "resuming into " + out.string())) << resumed.out;
  EXPECT_EQ(slurp(out / "checkpoints" / "latest"), "step-000006\n");
  EXPECT_FALSE(fs::exists(d / "runs"));
  auto over = run(train(d, "finished", out, {"train.steps=3"}, {"--overwrite"}), d);
  ASSERT_EQ(over.code, 0) << over.err;
  EXPECT_TRUE(contains(over.out, "--overwrite: removed the earlier run")) << over.out;
  EXPECT_EQ(slurp(out / "checkpoints" / "latest"), "step-000003\n");
  EXPECT_FALSE(fs::exists(out / "checkpoints" / "step-000006"));
}

// 3. A killed run's half-written checkpoint folders are removed at the next start, which says so; a
// checkpoint folder that cannot be written is an error before the first step, not after the training.
TEST(RunFolder, StaleTemporariesGoAndAnUnwritableFolderFailsAtStart) {
  const auto d = fresh("stale");
  const auto out = d / "run";
  const fs::path stale = out / "checkpoints" / "step-000007.tmp-999999999";  // no such process
  fs::create_directories(stale);
  std::ofstream(stale / "model.safetensors") << "half";
  auto r = run(train(d, "stale", out, {"train.steps=2"}), d);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(contains(r.out, "removed " + stale.string())) << r.out;

  const auto out2 = d / "run2";
  fs::create_directories(out2);
  std::ofstream(out2 / "checkpoints") << "a file where the checkpoint folder goes";
  auto bad = run(train(d, "stale", out2, {"train.steps=500", "train.log_every=1"}), d);
  EXPECT_NE(bad.code, 0);
  EXPECT_TRUE(contains(bad.err, (out2 / "checkpoints").string())) << bad.err;
  EXPECT_FALSE(fs::exists(out2 / "metrics.jsonl")) << "it trained before finding out";
}

// 4. --init with a checkpoint whose config.toml describes a model far larger than its model file (the
// manifest's CRCs made valid, as a hostile file would have them): refused before anything is allocated.
TEST(RunFolder, InitFromAHostileConfigIsRefusedBeforeAllocating) {
  const auto d = fresh("init_hostile");
  ASSERT_EQ(run(train(d, "init_hostile", d / "base", {"train.steps=2"}), d).code, 0);
  auto ck = load_checkpoint((d / "base" / "checkpoints").string());
  const auto cfg = load_run_config_text(ck.config_toml, "ckpt", {"model.n_layer=1000000"});
  ck.config_toml = cfg.to_toml();
  save_checkpoint((d / "hostile").string(), ck);  // every CRC right
  auto r =
      run({"train", "--init", (d / "hostile").string(), "--out", (d / "run").string(), "--no-report"}, d);
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.err, "describes a model of at least")) << r.err;
  EXPECT_LT(r.max_rss_kb, 2L * 1024 * 1024) << "peak RSS " << r.max_rss_kb << " kB";
}

// 5. A corpus line of any length is cut before the tokenizer: a 16 MB single-line .txt trains with memory
// bounded by the input, not by the line (it peaked at 2.2 GB for a 20 MB line before).
TEST(InputLimits, AHugeSingleLineIsCutBeforeTheTokenizer) {
  const auto d = fresh("long_line");
  const auto corpus = d / "corpus";
  fs::create_directories(corpus / "a");
  fs::create_directories(corpus / "b");
  {
    std::ofstream f(corpus / "a" / "long.txt");
    const std::string words = "the quick brown fox jumps over the lazy dog and runs far away ";
    for (size_t n = 0; n < (16u << 20); n += words.size()) f << words;  // one line
  }
  for (const char* dom : {"a", "b"})
    for (int i = 0; i < 4; ++i)
      std::ofstream(corpus / dom / ("doc" + std::to_string(i) + ".txt"))
          << "a small document of domain " << dom << " number " << i << " with a few more words in it.\n";
  auto r = run(train(d, "long_line", d / "run",
                     {"train.steps=2", "data.corpus=\"text:" + corpus.string() + "\"",
                      "data.validation_fraction=0.3"}),
               d);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_LT(r.max_rss_kb, 1200L * 1024) << "peak RSS " << r.max_rss_kb / 1024 << " MB for a 16 MB line";
}

// 6. --threads far past the machine is clamped with a warning (10000 made ~100 threads a second before).
TEST(InputLimits, ThreadsPastTheMachineAreClampedSayingSo) {
  const auto d = fresh("threads");
  auto r = run({"--threads", "10000", "info"}, d);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "10000 threads asked for")) << r.err;
  EXPECT_TRUE(contains(r.err, "using ")) << r.err;
}

// 7. A run stopped early says so, and its progress bar ends at the step it reached.
TEST(InputLimits, StopAfterSaysItStoppedAndTheBarEndsThere) {
  const auto d = fresh("stop_after");
  auto r = run(train(d, "stop_after", d / "run", {"train.steps=1000"}, {"--stop-after", "3"}), d);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "3/1000")) << r.out;
  EXPECT_FALSE(contains(r.out, "1000/1000")) << r.out;
  EXPECT_TRUE(contains(r.out, "stopped at 3 of 1000")) << r.out;
  EXPECT_TRUE(contains(r.out, "stopped after step 3 (--stop-after 3)")) << r.out;
}

// 8. generate: sampling parameters checked at parse time, the prompt and the context named, no stack
// trace; --prompt-file; the continuation as decoded.
TEST(InputLimits, GenerateChecksItsParametersAndSaysWhereItStopped) {
  const auto d = fresh("generate");
  ASSERT_EQ(run(train(d, "generate", d / "run", {"train.steps=3"}), d).code, 0);
  const std::string ckpt = (d / "run" / "checkpoints").string();
  auto gen = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = {"generate", "--checkpoint", ckpt};
    a.insert(a.end(), extra.begin(), extra.end());
    return run(a, d);
  };
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{{"--temperature", "nan"},
                                                                                    {"--temperature", "-1"},
                                                                                    {"--top-p", "0"},
                                                                                    {"--top-p", "nan"},
                                                                                    {"--max-tokens", "0"}}) {
    auto r = gen({"--prompt", "a", flag, value});
    EXPECT_EQ(r.code, 1) << flag << " " << value << ": " << r.err;
    EXPECT_TRUE(contains(r.err, flag)) << r.err;
    EXPECT_FALSE(has_stack_trace(r.err)) << r.err;
    EXPECT_LT(r.err.size(), 300u) << r.err;
  }
  std::string long_prompt;
  for (int i = 0; i < 200; ++i) long_prompt += "tools ";
  auto too_long = gen({"--prompt", long_prompt});
  EXPECT_EQ(too_long.code, 1) << too_long.err;
  EXPECT_TRUE(contains(too_long.err, "the model's context is 16")) << too_long.err;
  EXPECT_FALSE(has_stack_trace(too_long.err)) << too_long.err;
  auto context = gen({"--prompt", "a", "--max-tokens", "1000000000", "--ignore-eos", "--temperature", "0"});
  ASSERT_EQ(context.code, 0) << context.err;
  EXPECT_TRUE(contains(context.err, "stopped at the model's context of 16 tokens")) << context.err;
  std::ofstream(d / "prompt.txt") << long_prompt.substr(0, 20) << "\n";
  auto from_file = gen({"--prompt-file", (d / "prompt.txt").string(), "--max-tokens", "2"});
  ASSERT_EQ(from_file.code, 0) << from_file.err;
  EXPECT_EQ(from_file.out.rfind(long_prompt.substr(0, 20), 0), 0u) << from_file.out;
  auto neither = gen({});
  EXPECT_NE(neither.code, 0);
  EXPECT_TRUE(contains(neither.err, "--prompt")) << neither.err;
  // --dtype (docs/performance.md, "bf16 inference"): a bad value named; bf16 where the CPU has it.
  auto bad_dtype = gen({"--prompt", "a", "--dtype", "bf17"});
  EXPECT_EQ(bad_dtype.code, 1) << bad_dtype.err;
  EXPECT_TRUE(contains(bad_dtype.err, "--dtype")) << bad_dtype.err;
  EXPECT_FALSE(has_stack_trace(bad_dtype.err)) << bad_dtype.err;
  if (!bf16_support(read_cpu_features()).empty()) {
    auto b16 = gen({"--prompt", "a", "--dtype", "bf16", "--max-tokens", "3", "--temperature", "0"});
    ASSERT_EQ(b16.code, 0) << b16.err;
    EXPECT_TRUE(contains(b16.err, "weights: bf16")) << b16.err;
  }
}

// 9. Messages that name the key, the file or the value, and say what to do.
TEST(InputLimits, MessagesNameTheKeyTheFileOrTheValue) {
  const auto d = fresh("messages");
  auto bad = [&](const std::vector<std::string>& set) {
    std::vector<std::string> a = {"train", "--out", (d / "never").string()};
    for (auto& s : set) a.insert(a.end(), {"--set", s});
    return run(a, d);
  };
  auto big = bad({"train.steps=9223372036854775808"});
  EXPECT_TRUE(contains(big.err, "train.steps")) << big.err;
  EXPECT_TRUE(contains(big.err, "out of range")) << big.err;
  auto frac = bad({"data.validation_fraction=0"});
  EXPECT_TRUE(contains(frac.err, "data.validation_fraction")) << frac.err;
  for (const char* key : {"train.lr", "train.weight_decay", "train.adam_eps"}) {
    auto inf = bad({std::string(key) + "=inf"});
    EXPECT_NE(inf.code, 0);
    EXPECT_TRUE(contains(inf.err, key) && contains(inf.err, "finite")) << inf.err;
  }
  // (One argument may be 128 KiB at most: Linux's MAX_ARG_STRLEN.)
  auto huge = bad({"data.corpus=" + std::string(100 * 1024, 'x')});
  EXPECT_NE(huge.code, 0);
  EXPECT_LT(huge.err.size(), 1000u) << "the 100 kB value was echoed";
  // A binary file in a text corpus names the file.
  const auto corpus = d / "binary";
  fs::create_directories(corpus);
  std::ofstream(corpus / "ok.txt") << "some words\n";
  {
    std::ofstream image(corpus / "image.txt", std::ios::binary);  // an image's bytes: not text
    image << std::string("\x89PNG\r\n\x1a\n", 8);
    uint32_t x = 12345;
    for (int i = 0; i < 4096; ++i) image.put(char((x = x * 1664525u + 1013904223u) >> 24));
  }
  auto bin = bad({"data.corpus=\"text:" + corpus.string() + "\""});
  EXPECT_TRUE(contains(bin.err, (corpus / "image.txt").string())) << bin.err;
  EXPECT_TRUE(contains(bin.err, "not UTF-8 text")) << bin.err;
  EXPECT_FALSE(contains(bin.err, "character_coverage")) << bin.err;
  // A resumed checkpoint whose config.toml was edited (CRCs made valid): the key and what to do, not "not
  // readable by" the version that wrote it.
  ASSERT_EQ(run(train(d, "messages", d / "run", {"train.steps=2"}), d).code, 0);
  auto ck = load_checkpoint((d / "run" / "checkpoints").string());
  const auto pos = ck.config_toml.find("moe_every = 1");
  ASSERT_NE(pos, std::string::npos);
  ck.config_toml.replace(pos, 13, "moe_every = -4");
  save_checkpoint((d / "edited").string(), ck);
  auto edited = run({"train", "--resume", (d / "edited").string(), "--out", (d / "edited_run").string(),
                     "--set", "train.steps=4", "--no-report"},
                    d);
  EXPECT_NE(edited.code, 0);
  EXPECT_TRUE(contains(edited.err, "model.moe_every")) << edited.err;
  EXPECT_TRUE(contains(edited.err, "changed after it was written")) << edited.err;
  EXPECT_FALSE(contains(edited.err, "not readable by")) << edited.err;
  // An empty tokenizer.model is named.
  ck = load_checkpoint((d / "run" / "checkpoints").string());
  ck.tokenizer_model.clear();
  save_checkpoint((d / "no_tokenizer").string(), ck);
  auto empty = run({"generate", "--checkpoint", (d / "no_tokenizer").string(), "--prompt", "a"}, d);
  EXPECT_NE(empty.code, 0);
  EXPECT_TRUE(contains(empty.err, "tokenizer.model")) << empty.err;
}

// 10. A full disk at the first checkpoint: the message says no checkpoint of the run exists yet, not that
// "the previous one is kept".
TEST(InputLimits, AFullDiskAtTheFirstCheckpointSaysThereIsNoneYet) {
  const auto d = fresh("full_first");
  // A first run fills the data cache (its tokenizer is 240 kB); then, with files limited to 64 kB, the
  // metrics lines and the lock fit and the checkpoint (its tokenizer.model alone is 240 kB) does not.
  ASSERT_EQ(run(train(d, "full_first", d / "warm", {"train.steps=1"}), d).code, 0);
  auto r = run(train(d, "full_first", d / "run", {"train.steps=2"}), d, 64 * 1024);
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.err, "checkpoint not written")) << r.err;
  EXPECT_FALSE(contains(r.err, "kept")) << r.err;
  EXPECT_TRUE(contains(r.err, "no checkpoint of this run was written before it")) << r.err;
}

}  // namespace
}  // namespace moeforge
