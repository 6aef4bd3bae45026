// Past one process (docs/distributed.md): `moeforge train` launched as 2 ranks the way a user launches it
// (torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), against one process on the same data.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "moeforge/config/run_config.h"
#include "moeforge/dist/dist.h"
#include "moeforge/dist/expert_parallel.h"
#include "moeforge/dist/sync.h"
#include "moeforge/layer/dispatch.h"
#include "moeforge/layer/experts.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/routing/router.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A port nobody listens on now (the kernel's pick for port 0).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t n = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n);
  ::close(fd);
  return ntohs(a.sin_port);
}

struct Proc {
  pid_t pid = -1;
  fs::path log;  // stdout and stderr go to log/stdout, log/stderr
};

// Starts the built CLI with `args` and the variables `env` added to this process's environment.
Proc spawn(const std::vector<std::string>& args, const fs::path& log,
           const std::vector<std::pair<std::string, std::string>>& env) {
  fs::create_directories(log);
  const pid_t pid = fork();
  if (pid == 0) {
    const int out = ::open((log / "stdout").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = ::open((log / "stderr").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(out, 1);
    ::dup2(err, 2);
    for (auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    std::vector<char*> argv;
    static std::string cli = MOEFORGE_CLI;
    argv.push_back(cli.data());
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(cli.c_str(), argv.data());
    _exit(127);
  }
  return {pid, log};
}

struct Result {
  int code = -1;  // exit code, or 128 + signal
  std::string out, err;
};

Result wait_for(const Proc& p) {
  int status = 0;
  ::waitpid(p.pid, &status, 0);
  Result r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(p.log / "stdout");
  r.err = slurp(p.log / "stderr");
  return r;
}

// A temporary folder of this test binary's own (other tests use other names under TempDir).
fs::path scratch(const std::string& name) {
  const fs::path d = fs::path(::testing::TempDir()) / ("moeforge_dist_test_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// The tests' tiny model as a config file; `name` picks the data cache, shared by the runs of one test.
fs::path tiny_config_file(const fs::path& dir, const std::string& name,
                          const std::vector<std::string>& extra) {
  std::vector<std::string> o = {"train.log_every=1", "train.checkpoint_every=0"};
  o.insert(o.end(), extra.begin(), extra.end());
  const auto cfg = load_run_config_text("", "test", test::tiny_run_overrides("dist_" + name, o));
  const auto path = dir / "tiny.toml";
  std::ofstream(path) << cfg.to_toml();
  return path;
}

std::vector<std::string> train_args(const fs::path& config, const fs::path& out,
                                    const std::vector<std::string>& extra = {}) {
  std::vector<std::string> a = {"train", "--config", config.string(), "--out", out.string(), "--no-report"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

using Env = std::vector<std::pair<std::string, std::string>>;

Env rank_env(int rank, int world, int port, const std::string& timeout_s = "60") {
  return {{"RANK", std::to_string(rank)},        {"WORLD_SIZE", std::to_string(world)},
          {"LOCAL_RANK", std::to_string(rank)},  {"MASTER_ADDR", "127.0.0.1"},
          {"MASTER_PORT", std::to_string(port)}, {"MOEFORGE_DIST_TIMEOUT_S", timeout_s}};
}

// Runs `args` as ranks 0 and 1 of a group; logs under dir/rank0, dir/rank1.
std::vector<Result> run_two_ranks(const std::vector<std::string>& args, const fs::path& dir,
                                  const std::vector<std::string>& rank1_extra = {},
                                  const Env& extra_env = {}) {
  const int port = free_port();
  auto a1 = args;
  a1.insert(a1.end(), rank1_extra.begin(), rank1_extra.end());
  auto e0 = rank_env(0, 2, port), e1 = rank_env(1, 2, port);
  e0.insert(e0.end(), extra_env.begin(), extra_env.end());
  e1.insert(e1.end(), extra_env.begin(), extra_env.end());
  auto p0 = spawn(args, dir / "rank0", e0);
  auto p1 = spawn(a1, dir / "rank1", e1);
  return {wait_for(p0), wait_for(p1)};
}

// Runs `args` as ranks 0 .. n-1 of a group; logs under dir/rank<R>.
std::vector<Result> run_ranks(int n, const std::vector<std::string>& args, const fs::path& dir) {
  const int port = free_port();
  std::vector<Proc> p;
  for (int r = 0; r < n; ++r)
    p.push_back(spawn(args, dir / ("rank" + std::to_string(r)), rank_env(r, n, port)));
  std::vector<Result> out;
  for (auto& q : p) out.push_back(wait_for(q));
  return out;
}

// step -> `key` (the training loss by default) of a run's metrics.jsonl training rows.
std::map<int64_t, double> train_losses(const fs::path& run, const std::string& key = "loss") {
  std::map<int64_t, double> out;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.at("split") == "train") out[j.at("step").get<int64_t>()] = j.at(key).get<double>();
  }
  return out;
}

// The "state digest" lines a rank printed, in order.
std::vector<std::string> digests(const std::string& out) {
  std::vector<std::string> d;
  std::regex re("state digest at step ([0-9]+): ([0-9a-f]+)");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), re); it != std::sregex_iterator(); ++it)
    d.push_back((*it)[1].str() + ":" + (*it)[2].str());
  return d;
}

// Largest |a - b| over the tensors of two checkpoints' models, and the name where it is.
std::pair<double, std::string> max_param_diff(const fs::path& a, const fs::path& b) {
  auto ca = load_checkpoint(resolve_checkpoint_dir(a.string()));
  auto cb = load_checkpoint(resolve_checkpoint_dir(b.string()));
  std::map<std::string, torch::Tensor> mb(cb.model.begin(), cb.model.end());
  double worst = 0;
  std::string where;
  for (auto& [name, t] : ca.model) {
    EXPECT_TRUE(mb.count(name)) << name;
    if (!mb.count(name)) continue;
    const double d = (t.to(torch::kDouble) - mb[name].to(torch::kDouble)).abs().max().item<double>();
    if (d > worst) worst = d, where = name;
  }
  return {worst, where};
}

TEST(DistEnv, ReadsTorchrunAndMpirunVariables) {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "RANK",
                        "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MOEFORGE_DIST_TIMEOUT_S"})
    ::unsetenv(v);
  auto e = dist::launch_env_from_environment();
  EXPECT_EQ(e.launcher, "single");
  EXPECT_EQ(e.world, 1);
  ::setenv("WORLD_SIZE", "4", 1);
  ::setenv("RANK", "3", 1);
  ::setenv("MASTER_PORT", "1234", 1);
  e = dist::launch_env_from_environment();
  EXPECT_EQ(e.launcher, "env");
  EXPECT_EQ(e.world, 4);
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.master_port, 1234);
  ::setenv("OMPI_COMM_WORLD_SIZE", "2", 1);  // mpirun's variables win over torchrun's
  ::setenv("OMPI_COMM_WORLD_RANK", "1", 1);
  e = dist::launch_env_from_environment();
  EXPECT_EQ(e.launcher, "mpirun");
  EXPECT_EQ(e.world, 2);
  EXPECT_EQ(e.rank, 1);
  ::setenv("OMPI_COMM_WORLD_RANK", "2", 1);
  try {
    dist::launch_env_from_environment();
    ADD_FAILURE() << "a rank >= the world size was accepted";
  } catch (const dist::DistError& err) {
    EXPECT_NE(std::string(err.what()).find("OMPI_COMM_WORLD_RANK"), std::string::npos) << err.what();
  }
  ::setenv("OMPI_COMM_WORLD_RANK", "0", 1);
  ::setenv("MOEFORGE_DIST_TIMEOUT_S", "soon", 1);
  try {
    dist::launch_env_from_environment();
    ADD_FAILURE() << "a malformed timeout was accepted";
  } catch (const dist::DistError& err) {
    EXPECT_NE(std::string(err.what()).find("MOEFORGE_DIST_TIMEOUT_S"), std::string::npos) << err.what();
  }
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT",
                        "MOEFORGE_DIST_TIMEOUT_S"})
    ::unsetenv(v);
}

// Data parallelism: 2 ranks with the global batch of 4 sequences (2 each) against one process with all 4,
// 5 steps of the tiny top-2 model with its Switch balance loss and z-loss (the balance loss's expert shares
// are the global batch's, docs/distributed.md).
//
// Tolerance: the two runs do the same arithmetic but for the order of float32 sums: each rank's gradient
// is the mean over its 32 tokens and the ranks' are averaged, against one mean over 64; the rows of the
// global batch meet in different GEMM blockings. Those differ by a few float32 ulps (~1e-7 relative) per
// step; Adam's normalised update m / sqrt(v) turns a relative gradient difference into an absolute weight
// difference of up to lr times it, more for weights whose gradient is near zero, and 5 steps at lr 1e-2
// compound that (measured: 1.7e-5 here, 3.9e-5 with expert parallelism). So losses agree to 1e-4
// relative and parameters to 5e-4 absolute: well below one Adam step (~lr = 1e-2), which is what a real
// mismatch, e.g. a rank training on the wrong rows, moves weights by (and the losses by >1e-2).
TEST(DistTrain, DataParallelTwoRanksEqualOneProcessWithTheGlobalBatch) {
  const auto dir = scratch("dp");
  const auto cfg = tiny_config_file(dir, "dp", {"train.steps=5", "train.batch_size=4"});
  auto one = wait_for(spawn(train_args(cfg, dir / "one"), dir / "one_log", {}));
  ASSERT_EQ(one.code, 0) << one.err;
  auto two = run_two_ranks(train_args(cfg, dir / "two"), dir / "two_log");
  ASSERT_EQ(two[0].code, 0) << two[0].err << two[0].out;
  ASSERT_EQ(two[1].code, 0) << two[1].err << two[1].out;
  EXPECT_NE(two[1].out.find("rank 1 of 2"), std::string::npos) << two[1].out;
  const auto l1 = train_losses(dir / "one"), l2 = train_losses(dir / "two");
  ASSERT_EQ(l1.size(), 5u);
  ASSERT_EQ(l2.size(), 5u);
  for (auto& [step, loss] : l1) EXPECT_NEAR(l2.at(step), loss, 1e-4 * std::abs(loss)) << "step " << step;
  auto [diff, where] = max_param_diff(dir / "one" / "checkpoints", dir / "two" / "checkpoints");
  EXPECT_LT(diff, 5e-4) << where;
  std::cout << "data parallel: max |loss diff| / loss over 5 steps and max |param diff| " << diff << " ("
            << where << ")\n";
  // Only rank 0 wrote the run folder; both ranks held the same state.
  EXPECT_EQ(digests(two[0].out), digests(two[1].out));
  EXPECT_FALSE(digests(two[0].out).empty());
}

// The gradient all-reduce overlapped with backward changes the speed, not the result: 2 ranks with two
// micro-batches per step, with the overlap and without it (MOEFORGE_DIST_OVERLAP=0) and with another
// bucket size, reach bit-identical states at every step (docs/distributed.md, "Gradients").
TEST(DistTrain, GradientOverlapReachesTheSameBitsAsAveragingAfterBackward) {
  const auto dir = scratch("overlap");
  const auto cfg = tiny_config_file(
      dir, "overlap",
      {"train.steps=3", "train.batch_size=4", "train.grad_accum=2", "train.checkpoint_every=1"});
  std::vector<std::string> d[3];
  const Env envs[3] = {{}, {{"MOEFORGE_DIST_OVERLAP", "0"}}, {{"MOEFORGE_DIST_BUCKET_KB", "4"}}};
  for (int k = 0; k < 3; ++k) {
    const auto run = "run" + std::to_string(k);
    auto two = run_two_ranks(train_args(cfg, dir / run), dir / (run + "_log"), {}, envs[k]);
    ASSERT_EQ(two[0].code, 0) << two[0].err << two[0].out;
    ASSERT_EQ(two[1].code, 0) << two[1].err << two[1].out;
    d[k] = digests(two[0].out);
    EXPECT_EQ(d[k], digests(two[1].out)) << run;
    const auto at = two[0].out.find("after backward (");
    ASSERT_NE(at, std::string::npos) << two[0].out;
    std::cout << run << ": " << two[0].out.substr(at + 16, two[0].out.find(')', at) - at - 16) << "\n";
  }
  ASSERT_EQ(d[0].size(), 3u);
  EXPECT_EQ(d[0], d[1]) << "overlapped against after backward";
  EXPECT_EQ(d[0], d[2]) << "1 MiB buckets against 4 KiB buckets";
}

// Expert groups smaller than the world: 4 ranks with dist.expert_parallel = 2, so ranks 0-1 and 2-3 each
// hold all experts between them and ranks 0 and 2 (1 and 3) the same shard, whose gradients are averaged
// over them. 5 steps against one process with the same global batch, within the 2-rank tests'
// tolerances (the same reasons: float32 sums in another order); all four ranks end in the same state.
TEST(DistTrain, ExpertGroupsOfTwoInFourRanksEqualOneProcess) {
  const auto dir = scratch("ep_groups");
  const auto cfg =
      tiny_config_file(dir, "ep_groups", {"train.steps=5", "train.batch_size=4", "dist.expert_parallel=2"});
  auto one = wait_for(spawn(train_args(cfg, dir / "one"), dir / "one_log", {}));
  ASSERT_EQ(one.code, 0) << one.err;
  auto four = run_ranks(4, train_args(cfg, dir / "four"), dir / "four_log");
  for (int r = 0; r < 4; ++r)
    ASSERT_EQ(four[size_t(r)].code, 0) << "rank " << r << ": " << four[size_t(r)].err;
  EXPECT_NE(four[2].out.find("experts [0, 2) of 4 on this rank"), std::string::npos) << four[2].out;
  EXPECT_NE(four[3].out.find("experts [2, 4) of 4 on this rank"), std::string::npos) << four[3].out;
  const auto l1 = train_losses(dir / "one"), l4 = train_losses(dir / "four");
  ASSERT_EQ(l1.size(), 5u);
  ASSERT_EQ(l4.size(), 5u);
  for (auto& [step, loss] : l1) EXPECT_NEAR(l4.at(step), loss, 1e-4 * std::abs(loss)) << "step " << step;
  // The gradient norm before clipping: AdamW's steps hardly change when every expert gradient is off by
  // one factor, the norm does (a shard averaged but not divided by G would give a larger one).
  const auto n1 = train_losses(dir / "one", "grad_norm"), n4 = train_losses(dir / "four", "grad_norm");
  for (auto& [step, n] : n1) EXPECT_NEAR(n4.at(step), n, 1e-3 * n) << "grad norm, step " << step;
  auto [diff, where] = max_param_diff(dir / "one" / "checkpoints", dir / "four" / "checkpoints");
  EXPECT_LT(diff, 5e-4) << where;
  std::cout << "expert groups of 2 in 4 ranks: max |param diff| " << diff << " (" << where << ")\n";
  const auto d0 = digests(four[0].out);
  EXPECT_FALSE(d0.empty());
  for (int r = 1; r < 4; ++r) EXPECT_EQ(digests(four[size_t(r)].out), d0) << "rank " << r;
  // A group size that does not divide the world is refused on every rank, naming the key.
  const auto bad =
      tiny_config_file(dir, "ep_groups", {"train.steps=1", "train.batch_size=4", "dist.expert_parallel=4"});
  auto two = run_two_ranks(train_args(bad, dir / "bad"), dir / "bad_log");
  for (auto& r : two) {
    EXPECT_NE(r.code, 0);
    EXPECT_NE(r.err.find("dist.expert_parallel"), std::string::npos) << r.err;
  }
}

// Launched by OpenMPI's mpirun (its OMPI_COMM_WORLD_* variables; the rendezvous port passed with -x so
// that it does not collide with another run's), and with a FileStore rendezvous instead of the TCPStore:
// both reach the same state as the torchrun-style launch (the same digest, bit for bit).
TEST(DistLaunch, MpirunAndFileStoreReachTheSameStateAsTorchrunStyle) {
  const auto dir = scratch("launch");
  const auto cfg = tiny_config_file(dir, "launch", {"train.steps=3", "train.batch_size=4"});
  auto env_run = run_two_ranks(train_args(cfg, dir / "env"), dir / "env_log");
  ASSERT_EQ(env_run[0].code, 0) << env_run[0].err;
  const auto expect = digests(env_run[0].out);
  ASSERT_EQ(expect.size(), 1u);

  const std::string port = std::to_string(free_port());
  std::vector<std::string> mpi = {"/usr/bin/mpirun",
                                  "-np",
                                  "2",
                                  "--allow-run-as-root",
                                  "--oversubscribe",
                                  "-x",
                                  "MASTER_ADDR=127.0.0.1",
                                  "-x",
                                  "MASTER_PORT=" + port,
                                  MOEFORGE_CLI};
  const auto targs = train_args(cfg, dir / "mpi");
  mpi.insert(mpi.end(), targs.begin(), targs.end());
  ASSERT_TRUE(fs::exists(mpi[0]))
      << "mpirun (Debian's openmpi-bin, scripts/install-deps.sh) is not installed";
  fs::create_directories(dir / "mpi_log");
  const pid_t pid = fork();
  if (pid == 0) {
    const int out = ::open((dir / "mpi_log" / "stdout").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(out, 1);
    ::dup2(out, 2);
    std::vector<char*> argv;
    for (auto& a : mpi) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  auto r = wait_for({pid, dir / "mpi_log"});
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("rank 1 of 2 (mpirun)"), std::string::npos) << r.out;
  EXPECT_EQ(digests(r.out), (std::vector<std::string>{expect[0], expect[0]})) << r.out;  // both ranks'

  const auto store = dir / "store";
  Proc p[2];
  for (int k = 0; k < 2; ++k) {
    Env e = {{"RANK", std::to_string(k)},
             {"WORLD_SIZE", "2"},
             {"MOEFORGE_DIST_STORE_FILE", store.string()},
             {"MOEFORGE_DIST_TIMEOUT_S", "60"}};
    p[k] = spawn(train_args(cfg, dir / "file"), dir / ("file_log" + std::to_string(k)), e);
  }
  for (int k = 0; k < 2; ++k) {
    auto f = wait_for(p[k]);
    ASSERT_EQ(f.code, 0) << f.err;
    EXPECT_EQ(digests(f.out), expect);
  }
}

// Expert parallelism in training (dist.expert_parallel = 2): each rank holds 2 of the 4 experts of every
// MoE layer, rows travel by all-to-all, the rest is data parallel. 5 steps equal one process with the
// same config (where every expert is local) within the data-parallel tolerances above (the same float32
// reorderings, plus an expert's rows from both ranks meeting in its GEMMs in another order); the
// checkpoint holds all experts, evaluates in one process, and a 2-rank checkpoint at step 3 resumed in one
// process continues within the same tolerance.
TEST(DistTrain, ExpertParallelTwoRanksEqualOneProcess) {
  const auto dir = scratch("ep_train");
  const auto cfg =
      tiny_config_file(dir, "ep", {"train.steps=5", "train.batch_size=4", "dist.expert_parallel=2"});
  auto one = wait_for(spawn(train_args(cfg, dir / "one"), dir / "one_log", {}));
  ASSERT_EQ(one.code, 0) << one.err;
  auto two = run_two_ranks(train_args(cfg, dir / "two"), dir / "two_log");
  ASSERT_EQ(two[0].code, 0) << two[0].err << two[0].out;
  ASSERT_EQ(two[1].code, 0) << two[1].err << two[1].out;
  EXPECT_NE(two[1].out.find("experts [2, 4) of 4 on this rank"), std::string::npos) << two[1].out;
  const auto l1 = train_losses(dir / "one"), l2 = train_losses(dir / "two");
  ASSERT_EQ(l1.size(), 5u);
  ASSERT_EQ(l2.size(), 5u);
  for (auto& [step, loss] : l1) EXPECT_NEAR(l2.at(step), loss, 1e-4 * std::abs(loss)) << "step " << step;
  const auto n1 = train_losses(dir / "one", "grad_norm"), n2 = train_losses(dir / "two", "grad_norm");
  for (auto& [step, n] : n1) EXPECT_NEAR(n2.at(step), n, 1e-3 * n) << "grad norm, step " << step;
  auto [diff, where] = max_param_diff(dir / "one" / "checkpoints", dir / "two" / "checkpoints");
  EXPECT_LT(diff, 5e-4) << where;
  std::cout << "expert parallel: max |param diff| " << diff << " (" << where << ")\n";
  auto ev = wait_for(spawn({"eval", "--checkpoint", (dir / "two" / "checkpoints").string(), "--batches", "1"},
                           dir / "eval_log", {}));
  EXPECT_EQ(ev.code, 0) << ev.err;
  // 2 ranks to step 3, one process from there to 5.
  auto first = run_two_ranks(train_args(cfg, dir / "resumed", {"--stop-after", "3"}), dir / "first_log");
  ASSERT_EQ(first[0].code, 0) << first[0].err;
  auto rest = wait_for(spawn({"train", "--resume", (dir / "resumed" / "checkpoints").string(), "--out",
                              (dir / "resumed").string(), "--no-report"},
                             dir / "rest_log", {}));
  ASSERT_EQ(rest.code, 0) << rest.err;
  const auto l3 = train_losses(dir / "resumed");
  ASSERT_EQ(l3.size(), 5u);
  for (auto& [step, loss] : l2) EXPECT_NEAR(l3.at(step), loss, 1e-4 * std::abs(loss)) << "step " << step;
}

// Every router trains 3 steps at 2 ranks with its state (loss-free bias, BIP dual, EC thresholds,
// reliability EMAs, MoCE centroids, utilisation counters) the same bit for bit on both ranks: the trainer
// checks it at every checkpoint and prints the digest (of everything but the expert shards, which are each
// rank's own under expert parallelism).
TEST(DistTrain, EveryRouterKeepsOneStateOnEveryRank) {
  const std::vector<std::vector<std::string>> routers = {{"moe.router=\"topk\""},
                                                         {"moe.router=\"loss_free\""},
                                                         {"moe.router=\"bip\""},
                                                         {"moe.router=\"expert_choice\""},
                                                         {"moe.router=\"hierarchical\"", "moe.n_cluster=2"},
                                                         {"moe.router=\"moce\"", "moe.n_cluster=2"}};
  for (const auto& r : routers) {
    const std::string name =
        r.front().substr(r.front().find('"') + 1, r.front().rfind('"') - r.front().find('"') - 1);
    SCOPED_TRACE(name);
    for (const std::string ep : {"1", "2"}) {  // data parallel, then with the experts sharded too
      SCOPED_TRACE("dist.expert_parallel=" + ep);
      const auto dir = scratch("router_" + name + "_ep" + ep);
      std::vector<std::string> o = {"train.steps=3", "train.batch_size=4", "train.checkpoint_every=1",
                                    "dist.expert_parallel=" + ep};
      o.insert(o.end(), r.begin(), r.end());
      const auto cfg = tiny_config_file(dir, "routers", o);
      auto two = run_two_ranks(train_args(cfg, dir / "run"), dir / "log");
      ASSERT_EQ(two[0].code, 0) << two[0].err;
      ASSERT_EQ(two[1].code, 0) << two[1].err;
      const auto d0 = digests(two[0].out), d1 = digests(two[1].out);
      EXPECT_EQ(d0.size(), 3u) << two[0].out;  // steps 1 and 2, and the final checkpoint at 3
      EXPECT_EQ(d0, d1);
    }
  }
}

// A configuration that differs between ranks is an error at start on every rank, naming the rank.
TEST(DistTrain, MismatchedConfigIsAClearErrorNamingTheRank) {
  const auto dir = scratch("mismatch");
  const auto cfg = tiny_config_file(dir, "mismatch", {"train.steps=2"});
  auto two = run_two_ranks(train_args(cfg, dir / "run"), dir / "log", {"--set", "train.lr=0.02"});
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(two[size_t(r)].code, 0) << two[size_t(r)].out;
    EXPECT_NE(two[size_t(r)].err.find("configuration"), std::string::npos) << two[size_t(r)].err;
    EXPECT_NE(two[size_t(r)].err.find("of rank 1 differs from rank 0"), std::string::npos)
        << two[size_t(r)].err;
    EXPECT_NE(two[size_t(r)].err.find("rank 1 has 'train.lr = 0.02"), std::string::npos)
        << two[size_t(r)].err;
  }
}

// Resume on another world size: 2 ranks train 3 of 6 steps and checkpoint; one process continues from
// that checkpoint to step 6, against 2 ranks that ran all 6 without stopping. The global batch, the data
// order and the state are the world size's business no more than the LR schedule is, so the continuation
// matches within the data-parallel tolerance (see above: float32 sums in another order).
TEST(DistTrain, TwoRanksCheckpointResumeInOneProcess) {
  const auto dir = scratch("resume");
  const auto cfg = tiny_config_file(dir, "resume", {"train.steps=6", "train.batch_size=4"});
  auto straight = run_two_ranks(train_args(cfg, dir / "straight"), dir / "straight_log");
  ASSERT_EQ(straight[0].code, 0) << straight[0].err;
  auto first = run_two_ranks(train_args(cfg, dir / "run", {"--stop-after", "3"}), dir / "first_log");
  ASSERT_EQ(first[0].code, 0) << first[0].err;
  ASSERT_EQ(first[1].code, 0) << first[1].err;
  auto rest = wait_for(spawn({"train", "--resume", (dir / "run" / "checkpoints").string(), "--out",
                              (dir / "run").string(), "--no-report"},
                             dir / "rest_log", {}));
  ASSERT_EQ(rest.code, 0) << rest.err;
  const auto expect = train_losses(dir / "straight"), got = train_losses(dir / "run");
  ASSERT_EQ(expect.size(), 6u);
  ASSERT_EQ(got.size(), 6u);
  for (auto& [step, loss] : expect) {
    if (step <= 3)
      EXPECT_EQ(got.at(step), loss) << "step " << step;  // the same 2-rank run up to the checkpoint
    else
      EXPECT_NEAR(got.at(step), loss, 1e-4 * std::abs(loss)) << "step " << step;
  }
  // The resumed process's checkpoint and the 2-rank one also load and evaluate in one process.
  auto ev =
      wait_for(spawn({"eval", "--checkpoint", (dir / "straight" / "checkpoints").string(), "--batches", "1"},
                     dir / "eval_log", {}));
  EXPECT_EQ(ev.code, 0) << ev.err;
}

// The other way: one process trains 3 of 6 steps and checkpoints; 2 ranks continue from it to step 6,
// data parallel and, with the resumable key dist.expert_parallel, with the experts sharded; both against
// one process straight to 6 (the data-parallel tolerance above).
TEST(DistTrain, OneProcessCheckpointResumesOnTwoRanks) {
  const auto dir = scratch("resume_up");
  const auto cfg = tiny_config_file(dir, "resume_up", {"train.steps=6", "train.batch_size=4"});
  auto straight = wait_for(spawn(train_args(cfg, dir / "straight"), dir / "straight_log", {}));
  ASSERT_EQ(straight.code, 0) << straight.err;
  const auto expect = train_losses(dir / "straight");
  ASSERT_EQ(expect.size(), 6u);
  for (const std::string ep : {"1", "2"}) {
    SCOPED_TRACE("dist.expert_parallel=" + ep);
    const auto run = dir / ("run_ep" + ep);
    auto first = wait_for(spawn(train_args(cfg, run, {"--stop-after", "3"}), dir / ("first_log" + ep), {}));
    ASSERT_EQ(first.code, 0) << first.err;
    auto rest = run_two_ranks({"train", "--resume", (run / "checkpoints").string(), "--out", run.string(),
                               "--no-report", "--set", "dist.expert_parallel=" + ep},
                              dir / ("rest_log" + ep));
    ASSERT_EQ(rest[0].code, 0) << rest[0].err;
    ASSERT_EQ(rest[1].code, 0) << rest[1].err;
    const auto got = train_losses(run);
    ASSERT_EQ(got.size(), 6u);
    for (auto& [step, loss] : expect)
      EXPECT_NEAR(got.at(step), loss, 1e-4 * std::abs(loss)) << "step " << step;
  }
}

// A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-training: the other exits non-zero naming it, within
// the bound docs/distributed.md states (the collective timeout, here 10 s, plus the ~2.5 s diagnosis; a
// dead peer's socket closes at once, so that case is much faster), and the last checkpoint loads.
void kill_one_rank(int sig, int victim) {
  const auto dir = scratch("kill_" + std::to_string(sig) + "_" + std::to_string(victim));
  const auto cfg = tiny_config_file(
      dir, "kill",
      {"train.steps=100000", "train.batch_size=4", "train.checkpoint_every=5", "train.keep_checkpoints=2"});
  const int port = free_port();
  const auto args = train_args(cfg, dir / "run");
  Proc p[2] = {spawn(args, dir / "rank0", rank_env(0, 2, port, "10")),
               spawn(args, dir / "rank1", rank_env(1, 2, port, "10"))};
  // Until a checkpoint exists and training goes on (ctest's TIMEOUT guards a hang).
  auto logged = [&] {
    try {
      return train_losses(dir / "run").size();
    } catch (const nlohmann::json::exception&) {  // a line being written
      return size_t(0);
    }
  };
  while (!fs::exists(dir / "run" / "checkpoints" / "latest") || logged() < 12) {
    for (auto& q : p) {
      int status = 0;
      ASSERT_EQ(::waitpid(q.pid, &status, WNOHANG), 0) << "a rank exited early:\n" << slurp(q.log / "stderr");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const auto t0 = std::chrono::steady_clock::now();
  ::kill(p[victim].pid, sig);
  auto r = wait_for(p[1 - victim]);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (sig == SIGSTOP) ::kill(p[victim].pid, SIGKILL);
  wait_for(p[victim]);
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.err.find("rank " + std::to_string(victim)), std::string::npos) << r.err;
  // The stated bound (timeout + diagnosis) plus slack for a machine loaded by other tests (ctest -j).
  EXPECT_LT(took, 10.0 + 2.5 + 7.5) << r.err;
  std::cout << "rank " << 1 - victim << " exited " << took << " s after signal " << sig << " to rank "
            << victim << ": " << r.err;
  EXPECT_NO_THROW(load_checkpoint(resolve_checkpoint_dir((dir / "run" / "checkpoints").string())));
}

// SIGINT to one rank stops the group after the same step: both ranks checkpoint it (rank 0 writes) and
// exit 130 reporting SIGINT, and the checkpoint is at the last step logged.
TEST(DistSignals, SigintToOneRankStopsTheGroupWithOneCheckpoint) {
  const auto dir = scratch("sigint");
  const auto cfg = tiny_config_file(dir, "sigint", {"train.steps=100000", "train.batch_size=4"});
  const int port = free_port();
  const auto args = train_args(cfg, dir / "run");
  Proc p[2] = {spawn(args, dir / "rank0", rank_env(0, 2, port)),
               spawn(args, dir / "rank1", rank_env(1, 2, port))};
  auto logged = [&] {
    try {
      return train_losses(dir / "run").size();
    } catch (const nlohmann::json::exception&) {  // a line being written
      return size_t(0);
    }
  };
  while (logged() < 3) {
    for (auto& q : p) {
      int status = 0;
      ASSERT_EQ(::waitpid(q.pid, &status, WNOHANG), 0) << "a rank exited early:\n" << slurp(q.log / "stderr");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(p[1].pid, SIGINT);
  auto r0 = wait_for(p[0]), r1 = wait_for(p[1]);
  EXPECT_EQ(r0.code, 128 + SIGINT) << r0.err;
  EXPECT_EQ(r1.code, 128 + SIGINT) << r1.err;
  EXPECT_NE(r0.err.find("interrupted by SIGINT"), std::string::npos) << r0.err;
  const int64_t stopped = train_losses(dir / "run").rbegin()->first;
  EXPECT_EQ(slurp(dir / "run" / "checkpoints" / "latest"),
            "step-" + std::string(6 - std::to_string(stopped).size(), '0') + std::to_string(stopped) + "\n");
  EXPECT_NO_THROW(load_checkpoint(resolve_checkpoint_dir((dir / "run" / "checkpoints").string())));
}

TEST(DistFailure, KilledRankIsNamedByTheOther) {
  kill_one_rank(SIGKILL, 1);
}

TEST(DistFailure, KilledRankZeroIsNamedByTheOther) {
  kill_one_rank(SIGKILL, 0);
}

TEST(DistFailure, HungRankIsNamedWithinTheTimeout) {
  kill_one_rank(SIGSTOP, 1);
}

// Expert parallelism's exchanges at 2 ranks (the test binary runs itself twice as the ranks): each rank
// routes its own tokens over E = 4 experts, ranks own 2 each; dispatch, counts and rows all-to-all, local
// experts, reverse all-to-all, combine. The output and the input gradient must equal the one-process
// layer on the same rank's tokens with all experts, and each owned expert's weight gradient the sum over
// both ranks' tokens of the one-process gradients.
//
// Tolerance 1e-5 absolute on O(1) values: the exchanges move rows bit for bit; what differs is only the
// order in which an expert's rows from both ranks meet in its GEMMs and gradient sums (float32, a few
// ulps), and the all-reduce that sums the reference's weight gradients.
TEST(DistWorker, ExpertParallelExchange) {
  if (std::getenv("MOEFORGE_DIST_TEST_WORKER") == nullptr) GTEST_SKIP() << "run by DistExpertParallel";
  dist::init(dist::launch_env_from_environment());
  ASSERT_TRUE(dist::active());
  const int r = dist::rank();
  const int64_t E = 4, C = 16, F = 24, T = 10, K = 2;
  torch::manual_seed(1);
  Experts experts(E, C, F, ExpertAct::kSwiGLU, ExpertsImplKind::kReference);
  auto w = experts->weights();
  torch::manual_seed(100 + r);  // each rank its own tokens and choices
  auto x = torch::randn({T, C}, torch::requires_grad());
  auto expert = torch::empty({T, K}, torch::kLong);
  for (int64_t t = 0; t < T; ++t) expert[t] = torch::randperm(E).narrow(0, 0, K);  // K distinct experts
  auto gate = torch::rand({T, K});
  auto plan = build_plan_from_choices(expert, torch::ones({T, K}, torch::kBool), torch::Tensor(), gate, E, 0);
  auto probe = torch::randn({T, C});  // loss = sum(y * probe)

  // Expert-parallel: this rank's experts only.
  auto ex = dist::plan_exchange(plan.offsets(), E);
  const auto sh = ex.shard;
  EXPECT_EQ(sh.first, 2 * r);
  ExpertWeights local{w.act, w.w_gate.narrow(0, sh.first, sh.count), w.w_up.narrow(0, sh.first, sh.count),
                      w.w_down.narrow(0, sh.first, sh.count)};
  auto y_local = experts_reference(dist::dispatch_exchange(dispatch(x, plan), ex), ex.local_offsets, local);
  auto y = combine(dist::combine_exchange(y_local, ex), plan, T);
  (y * probe).sum().backward();

  // One process's layer on the same tokens with every expert.
  auto x1 = x.detach().clone().requires_grad_(true);
  auto g1 = w.w_gate.detach().clone().requires_grad_(true), u1 = w.w_up.detach().clone().requires_grad_(true),
       d1 = w.w_down.detach().clone().requires_grad_(true);
  auto y1 = combine(experts_reference(dispatch(x1, plan), plan.offsets(), {w.act, g1, u1, d1}), plan, T);
  (y1 * probe).sum().backward();
  EXPECT_LT((y - y1).abs().max().item<double>(), 1e-5);
  EXPECT_LT((x.grad() - x1.grad()).abs().max().item<double>(), 1e-5);
  std::vector<torch::Tensor> ref = {g1.grad().contiguous(), u1.grad().contiguous(), d1.grad().contiguous()};
  dist::allreduce_sum(ref, "the reference weight gradients");
  const torch::Tensor got[3] = {experts->w_gate.grad(), experts->w_up.grad(), experts->w_down.grad()};
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(got[i].defined());
    EXPECT_LT((got[i].narrow(0, sh.first, sh.count) - ref[size_t(i)].narrow(0, sh.first, sh.count))
                  .abs()
                  .max()
                  .item<double>(),
              1e-5)
        << "weight " << i;
    // The experts this rank does not own got nothing from it.
    const int64_t other = sh.first == 0 ? sh.count : 0;
    EXPECT_EQ(got[i].narrow(0, other, E - sh.count).abs().max().item<double>(), 0.0) << "weight " << i;
  }
  int64_t sent = 0;
  for (int64_t n : ex.send_rows) sent += n;
  EXPECT_EQ(sent, plan.n_assign());
  std::cout << "rank " << r << ": sent " << sent << " rows, received " << ex.regroup.numel() << "; "
            << dist::comm_stats().bytes << " bytes in " << dist::comm_stats().calls << " collectives\n";
  dist::barrier("end of the worker");
  dist::shutdown();
}

// Runs this test binary as ranks 0 and 1 of a group, each with --gtest_filter=`worker`, and checks that
// both passed; prints each rank's line that starts with "rank R: " + `tag`.
void run_worker_pair(const std::string& name, const std::string& worker, const std::string& tag) {
  const auto dir = scratch(name);
  const int port = free_port();
  Proc p[2];
  for (int r = 0; r < 2; ++r) {
    auto env = rank_env(r, 2, port);
    env.push_back({"MOEFORGE_DIST_TEST_WORKER", "1"});
    fs::create_directories(dir / std::to_string(r));
    const pid_t pid = fork();
    if (pid == 0) {
      const int out =
          ::open((dir / std::to_string(r) / "stdout").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(out, 1);
      ::dup2(out, 2);
      for (auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      const std::string filter = "--gtest_filter=" + worker;
      const char* argv[] = {"/proc/self/exe", filter.c_str(), nullptr};
      ::execv(argv[0], const_cast<char**>(argv));
      _exit(127);
    }
    p[r] = {pid, dir / std::to_string(r)};
  }
  for (int r = 0; r < 2; ++r) {
    int status = 0;
    ::waitpid(p[r].pid, &status, 0);
    const auto out = slurp(p[r].log / "stdout");
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "rank " << r << ":\n" << out;
    EXPECT_NE(out.find("[  PASSED  ] 1 test"), std::string::npos) << "rank " << r << ":\n" << out;
    const auto at = out.find("rank " + std::to_string(r) + ": " + tag);
    if (at != std::string::npos) std::cout << out.substr(at, out.find('\n', at) - at) << "\n";
  }
}

TEST(DistExpertParallel, TwoRanksMatchOneProcess) {
  run_worker_pair("ep", "DistWorker.ExpertParallelExchange", "sent");
}

// The gradient all-reduce overlapped with backward (GradientReducer, docs/distributed.md, "Gradients"),
// at 2 ranks: a chain of linear layers, two micro-batches per step (the reducer armed for the second),
// one bucket per layer. Every bucket must start inside backward (the parameters no rank or only one rank
// uses must not hold them back), and every gradient must equal, bit for bit, the mean over ranks of the
// gradients autograd accumulates without the reducer: an all-reduce of two float32 numbers is one
// addition, and the reducer adds a micro-batch's gradient to the earlier ones as autograd does. A
// parameter only rank 1 uses gets rank 1's gradient / 2 on both ranks; one that no rank uses keeps an
// undefined gradient. A second step checks that the reducer starts afresh.
TEST(DistWorker, GradientReducerOverlapsBackward) {
  if (std::getenv("MOEFORGE_DIST_TEST_WORKER") == nullptr) GTEST_SKIP() << "run by DistGradients";
  dist::init(dist::launch_env_from_environment());
  ASSERT_TRUE(dist::active());
  const int r = dist::rank();
  const int64_t C = 32, L = 6;
  torch::manual_seed(3);
  std::vector<torch::Tensor> params;  // L matrices, then the vector only rank 1 uses, then an unused one
  for (int64_t l = 0; l < L; ++l)
    params.push_back((torch::randn({C, C}) / std::sqrt(double(C))).requires_grad_(true));
  params.push_back(torch::randn({C}).requires_grad_(true));
  params.push_back(torch::randn({C}).requires_grad_(true));
  auto loss_of = [&](const std::vector<torch::Tensor>& P, int64_t micro, int64_t step) {
    torch::manual_seed(uint64_t(1000 + 100 * step + 10 * r + micro));  // each rank, micro-batch its data
    auto h = torch::randn({8, C});
    for (int64_t l = 0; l < L; ++l) h = torch::tanh(torch::matmul(h, P[size_t(l)]));
    auto loss = h.pow(2).mean();
    if (r == 1) loss = loss + (h * P[size_t(L)]).mean();
    return loss;
  };
  dist::GradientReducer reducer(params, C * C * 4);  // one C x C float32 matrix per bucket
  EXPECT_EQ(reducer.n_buckets(), L + 1);             // the two vectors share one
  for (int64_t step = 0; step < 2; ++step) {
    std::vector<torch::Tensor> copies, ref;
    for (auto& p : params) copies.push_back(p.detach().clone().requires_grad_(true));
    for (int64_t micro = 0; micro < 2; ++micro) loss_of(copies, micro, step).backward();
    for (auto& c : copies) ref.push_back(c.grad().defined() ? c.grad().clone() : torch::zeros_like(c));
    dist::allreduce_sum(ref, "the reference gradients");
    for (auto& t : ref) t.mul_(0.5);

    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    for (int64_t micro = 0; micro < 2; ++micro) {
      auto loss = loss_of(params, micro, step);
      if (micro == 1) reducer.arm(loss);
      loss.backward();
    }
    reducer.finish();
    EXPECT_EQ(reducer.started_in_backward(), reducer.n_buckets()) << "buckets waited for the end of backward";
    for (size_t i = 0; i + 1 < params.size(); ++i) {
      ASSERT_TRUE(params[i].grad().defined()) << "parameter " << i;
      EXPECT_TRUE(torch::equal(params[i].grad(), ref[i])) << "parameter " << i << " step " << step;
    }
    EXPECT_FALSE(params.back().grad().defined()) << "no rank reached it";
    std::cout << "rank " << r << ": step " << step << ": " << reducer.started_in_backward() << " of "
              << reducer.n_buckets() << " buckets started during backward\n";
  }
  dist::barrier("end of the worker");
  dist::shutdown();
}

TEST(DistGradients, ReducerOverlapsBackwardAndAveragesExactly) {
  run_worker_pair("grad", "DistWorker.GradientReducerOverlapsBackward", "step 1");
}

}  // namespace
}  // namespace moeforge
