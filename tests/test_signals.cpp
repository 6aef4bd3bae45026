// A real `moeforge train` process, a real SIGTERM / SIGINT: the run finishes its step, writes a checkpoint
// at that step, exits 128 + signal saying how to resume, and `--resume` continues exactly
// (docs/reliability.md).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "moeforge/config/run_config.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

struct Result {
  int code = -1;  // exit code, or 128 + signal if killed
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Starts the built CLI with `args`, stdout and stderr to files under `dir`.
pid_t spawn(const std::vector<std::string>& args, const fs::path& dir) {
  const pid_t pid = fork();
  if (pid == 0) {
    const int out = ::open((dir / "stdout").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = ::open((dir / "stderr").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(out, 1);
    ::dup2(err, 2);
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
  ::waitpid(pid, &status, 0);
  Result r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(dir / "stdout");
  r.err = slurp(dir / "stderr");
  return r;
}

// Train-split rows of metrics.jsonl: step -> loss. Fails on a duplicate (step, split).
std::map<int64_t, double> train_losses(const fs::path& run, bool* duplicate) {
  std::map<int64_t, double> out;
  std::set<std::pair<int64_t, std::string>> seen;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    auto key = std::make_pair(j.at("step").get<int64_t>(), j.at("split").get<std::string>());
    if (!seen.insert(key).second) *duplicate = true;
    if (key.second == "train") out[key.first] = j.at("loss").get<double>();
  }
  return out;
}

std::vector<std::string> train_args(const fs::path& run, const std::string& name,
                                    const std::vector<std::string>& extra) {
  // The tests' tiny model (the struct defaults plus tiny_run_overrides) as a config file: the CLI's own
  // default is configs/default.toml.
  const auto cfg = load_run_config_text(
      "", "test", test::tiny_run_overrides(name, {"train.steps=400", "train.log_every=1"}));
  const auto path = run / "tiny.toml";
  std::ofstream(path) << cfg.to_toml();
  std::vector<std::string> a = {"train", "--config", path.string(), "--out", run.string(), "--no-report"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

void signal_then_resume(int sig, const std::string& name) {
  const fs::path run = fs::path(::testing::TempDir()) / ("moeforge_signal_" + name);
  fs::remove_all(run);
  fs::create_directories(run);
  const pid_t pid = spawn(train_args(run, name, {}), run);
  // Wait (without a time limit of our own: ctest's TIMEOUT guards a hang) until step 3 is logged.
  bool dup = false;
  while (true) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, WNOHANG), 0) << "moeforge exited early:\n" << slurp(run / "stderr");
    if (fs::exists(run / "metrics.jsonl")) {
      try {
        if (train_losses(run, &dup).size() >= 3) break;
      } catch (const nlohmann::json::exception&) {  // a line being written
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(pid, sig);
  auto r = wait_for(pid, run);
  ASSERT_EQ(r.code, 128 + sig) << r.err;
  EXPECT_NE(r.err.find(sig == SIGINT ? "interrupted by SIGINT" : "interrupted by SIGTERM"), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("resume with: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--resume " + (run / "checkpoints").string()), std::string::npos) << r.err;
  // The checkpoint is at the last step logged: the step in progress was finished, not lost.
  auto losses = train_losses(run, &dup);
  EXPECT_FALSE(dup);
  const int64_t stopped = losses.rbegin()->first;
  EXPECT_EQ(slurp(run / "checkpoints" / "latest"),
            "step-" + std::string(6 - std::to_string(stopped).size(), '0') + std::to_string(stopped) + "\n");
  EXPECT_LT(stopped, 400);

  // Resume to 3 steps past the interruption, without changing train.steps (the LR schedule depends on it).
  const int64_t until = stopped + 3;
  auto r2 = wait_for(spawn({"train", "--resume", (run / "checkpoints").string(), "--out", run.string(),
                            "--no-report", "--stop-after", std::to_string(until)},
                           run),
                     run);
  ASSERT_EQ(r2.code, 0) << r2.err;
  auto resumed = train_losses(run, &dup);
  EXPECT_FALSE(dup) << "a (step, split) row appears twice in metrics.jsonl";
  ASSERT_EQ(int64_t(resumed.size()), until);

  // The same steps without the interruption: bit-identical losses (one thread, same data order, RNG and
  // optimiser state).
  const fs::path straight = run / "straight";
  fs::create_directories(straight);
  auto r3 = wait_for(spawn(train_args(straight, name, {"--stop-after", std::to_string(until)}), straight),
                     straight);
  ASSERT_EQ(r3.code, 0) << r3.err;
  auto expect = train_losses(straight, &dup);
  ASSERT_EQ(expect.size(), resumed.size());
  for (auto& [step, loss] : expect) EXPECT_EQ(resumed.at(step), loss) << "step " << step;
}

TEST(Signals, SigtermCheckpointsTheStepAndResumeContinuesExactly) {
  signal_then_resume(SIGTERM, "term");
}

TEST(Signals, SigintDoesTheSame) {
  signal_then_resume(SIGINT, "int");
}

}  // namespace
}  // namespace moeforge
