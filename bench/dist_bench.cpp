// moeforge bench --dist (dist_bench.h, docs/distributed.md "Measured").
#include "dist_bench.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/gnuplot.h"
#include "moeforge/util/progress.h"
#include "moeforge/util/runtime.h"

namespace moeforge {
namespace fs = std::filesystem;
namespace {

struct Setting {
  std::string name;
  int world;
  int expert_parallel;
  bool overlap;
};

// A port no one listens on now (the kernel's pick), for one run's rendezvous.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("bench --dist: no socket for a free port");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t n = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n) == 0;
  ::close(fd);
  if (!ok) throw std::runtime_error("bench --dist: could not find a free port on 127.0.0.1");
  return ntohs(a.sin_port);
}

std::string self_exe() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("bench --dist: cannot find this binary (/proc/self/exe): " + ec.message());
  return p.string();
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs `args` of this binary as `world` ranks (one process when world = 1), each with `env` added; logs
// in dir/rank<R>.log. A rank that fails is an error naming its log and its last lines.
void launch(const std::vector<std::string>& args, int world,
            const std::vector<std::pair<std::string, std::string>>& env, const fs::path& dir) {
  static const std::string exe = self_exe();
  const int port = world > 1 ? free_port() : 0;
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    const auto log = dir / ("rank" + std::to_string(r) + ".log");
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("bench --dist: fork failed");
    if (pid == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) ::dup2(fd, 1), ::dup2(fd, 2);
      for (auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      if (world > 1) {
        ::setenv("RANK", std::to_string(r).c_str(), 1);
        ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
        ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
        ::setenv("MASTER_ADDR", "127.0.0.1", 1);
        ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      } else {
        for (const char* k : {"RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"})
          ::unsetenv(k);
      }
      std::vector<char*> argv{const_cast<char*>(exe.c_str())};
      for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(exe.c_str(), argv.data());
      _exit(127);
    }
    pids.push_back(pid);
  }
  std::string failed;
  for (int r = 0; r < world; ++r) {
    int status = 0;
    ::waitpid(pids[size_t(r)], &status, 0);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && failed.empty()) {
      const auto log = dir / ("rank" + std::to_string(r) + ".log");
      auto text = slurp(log);
      if (text.size() > 1500) text = "..." + text.substr(text.size() - 1500);
      failed = "bench --dist: rank " + std::to_string(r) + " of the run in " + dir.string() + " failed (" +
               (WIFEXITED(status) ? "exit code " + std::to_string(WEXITSTATUS(status))
                                  : "signal " + std::to_string(WTERMSIG(status))) +
               "); its log " + log.string() + " ends:\n" + text;
    }
  }
  if (!failed.empty()) throw std::runtime_error(failed);
}

// The last training row of a run's metrics.jsonl.
nlohmann::json last_train_row(const fs::path& run) {
  std::ifstream in(run / "metrics.jsonl");
  nlohmann::json last;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("split", "") == "train") last = j;
  }
  if (last.is_null()) throw FileError((run / "metrics.jsonl").string(), "no training row");
  return last;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string fixed(double x, int p) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(p) << x;
  return o.str();
}

void plot(const nlohmann::json& result, const std::string& png) {
  const fs::path p(png);
  const fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  fs::create_directories(dir);
  const fs::path dat = dir / (p.stem().string() + ".dat");
  std::ostringstream d, gp;
  // One row per (model, setting): index, median, min, max, label.
  int i = 0;
  for (auto& [model, m] : result["models"].items())
    for (auto& [name, s] : m["settings"].items()) {
      auto v = s["tokens_per_s"].get<std::vector<double>>();
      d << i++ << " " << s["median_tokens_per_s"].get<double>() << " "
        << *std::min_element(v.begin(), v.end()) << " " << *std::max_element(v.begin(), v.end()) << " \""
        << model << "\\n"
        << name << "\"\n";
    }
  write_file_atomic(dat.string(), d.str());
  gp << "set terminal pngcairo noenhanced size 1200,520 font ',10'\nset output '" << png << "'\n"
     << "set title \"training tokens/s: 1 rank against 2 ranks on the same cores (median, min-max over "
     << result["rounds"].get<int>() << " rounds of " << result["steps"].get<int>() << " steps)\\n"
     << result["machine"].get<std::string>() << "\"\n"
     << "set style fill solid 0.6\nset boxwidth 0.6\nset grid ytics\nset yrange [0:*]\nset ylabel "
        "'tokens/s'\n"
     << "set xtics rotate by 0 font ',8'\nunset key\n"
     << "plot '" << dat.string()
     << "' using 1:2:xtic(5) with boxes, '' using 1:2:3:4 with yerrorbars lc black pt 0\n";
  const auto script = dir / (p.stem().string() + ".gp");
  write_file_atomic(script.string(), gp.str());
  run_gnuplot(script.string());
}

}  // namespace

nlohmann::json run_dist_bench(const DistBenchOptions& opt, std::ostream& log) {
  if (opt.threads < 2 || opt.threads % 2)
    throw ConfigError("--threads", std::to_string(opt.threads) +
                                       ": bench --dist needs an even number >= 2 "
                                       "(1 rank x T threads against 2 ranks x T/2)");
  for (auto& kv : opt.overrides)
    if (kv.rfind("train.grad_accum", 0) == 0 || kv.rfind("train.steps", 0) == 0 ||
        kv.rfind("train.threads", 0) == 0)
      throw ConfigError("--set", "'" + kv +
                                     "': bench --dist sets the steps and threads itself (--reps, "
                                     "--threads) and times steps of one micro-batch");
  const std::vector<std::pair<std::string, std::vector<std::string>>> models = [&] {
    std::vector<std::pair<std::string, std::vector<std::string>>> m = {{"default", {}}};
    if (!opt.quick) m.push_back({"wide", {"model.d_model=256", "model.d_ff=688", "moe.d_expert=344"}});
    return m;
  }();
  const std::vector<Setting> settings = {{"1 rank", 1, 1, true},
                                         {"2 ranks DP", 2, 1, true},
                                         {"2 ranks DP, no overlap", 2, 1, false},
                                         {"2 ranks EP", 2, 2, true}};
  char tmpl[] = "/tmp/moeforge-bench-dist.XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("bench --dist: cannot make a folder in /tmp");
  const fs::path root(tmpl);
  log << "bench --dist: " << opt.rounds << " round(s) of " << models.size() * settings.size()
      << " training runs (" << opt.steps << " steps each), in " << root.string() << "\n";

  nlohmann::json result = {{"machine", describe_machine()},
                           {"steps", opt.steps},
                           {"rounds", opt.rounds},
                           {"threads", opt.threads},
                           {"models", nlohmann::json::object()}};
  ProgressBar bar("bench --dist", int64_t(opt.rounds * models.size() * settings.size()), log);
  int64_t done = 0;
  for (int round = 0; round < opt.rounds; ++round)
    for (auto& [model, model_sets] : models)
      for (const auto& s : settings) {
        const fs::path dir =
            root / (model + "-" + std::to_string(&s - settings.data()) + "-r" + std::to_string(round));
        fs::create_directories(dir);
        const int threads = opt.threads / s.world;
        std::vector<std::string> args = {"train", "--out", (dir / "run").string(), "--no-report"};
        std::vector<std::string> sets = {"train.steps=" + std::to_string(opt.steps),
                                         "train.eval_every=0",
                                         "train.eval_batches=1",
                                         "train.log_every=1",
                                         "train.checkpoint_every=0",
                                         "train.threads=" + std::to_string(threads),
                                         "dist.expert_parallel=" + std::to_string(s.expert_parallel)};
        sets.insert(sets.end(), model_sets.begin(), model_sets.end());
        sets.insert(sets.end(), opt.overrides.begin(), opt.overrides.end());
        for (auto& kv : sets) args.push_back("--set"), args.push_back(kv);
        launch(args, s.world, {{"MOEFORGE_DIST_OVERLAP", s.overlap ? "1" : "0"}}, dir);
        const auto row = last_train_row(dir / "run");
        auto& m = result["models"][model];
        m["overrides"] = model_sets;
        m["tokens_per_step"] = row.value("plan_tokens", int64_t(0));
        auto& j = m["settings"][s.name];
        j["world"] = s.world;
        j["threads_per_rank"] = threads;
        j["expert_parallel"] = s.expert_parallel;
        j["overlap"] = s.overlap;
        j["tokens_per_s"].push_back(row.at("tokens_per_s").get<double>());
        if (s.world > 1) {
          auto d = nlohmann::json::parse(slurp(dir / "run" / "dist.json"), nullptr, false);
          if (d.is_discarded()) throw FileError((dir / "run" / "dist.json").string(), "not JSON");
          j["rank0"].push_back(d);
        }
        bar.update(++done,
                   model + ", " + s.name + ": " + fixed(row.at("tokens_per_s").get<double>(), 0) + " tok/s");
      }
  bar.finish();

  // Medians over rounds, ratios to the one-rank run of the same model.
  log << std::left << std::setw(9) << "model" << std::setw(24) << "setting" << std::right << std::setw(11)
      << "tokens/s" << std::setw(17) << "range" << std::setw(10) << "vs 1 rank" << std::setw(10) << "MB/step"
      << std::setw(11) << "comm %" << std::setw(11) << "a2a MB" << std::setw(8) << "a2a %" << std::setw(13)
      << "grad ms/step" << std::setw(11) << "overlap"
      << "\n";
  for (auto& [model, m] : result["models"].items()) {
    const double one = median(m["settings"]["1 rank"]["tokens_per_s"].get<std::vector<double>>());
    for (auto& item : m["settings"].items()) {
      // Not a structured binding: the lambda below takes `s`, which C++17 does not allow of a binding.
      const std::string name = item.key();
      auto& s = item.value();
      auto v = s["tokens_per_s"].get<std::vector<double>>();
      const double med = median(v);
      s["median_tokens_per_s"] = med;
      s["ratio_to_one_rank"] = med / one;
      const double tokens = m["tokens_per_step"].get<double>();
      if (tokens > 0) s["step_ms"] = 1e3 * tokens / med;
      auto med_of = [&](const char* key) {
        std::vector<double> x;
        if (s.contains("rank0"))
          for (auto& d : s["rank0"]) x.push_back(d.at(key).get<double>());
        return median(x);
      };
      if (s.contains("rank0"))
        for (const char* key : {"bytes_per_step", "collectives_per_step", "comm_ms_per_step", "comm_share",
                                "grad_sync_ms_per_step", "grad_buckets_overlapped_per_step",
                                "a2a_bytes_per_step", "a2a_ms_per_step", "a2a_share"})
          s[std::string("median_") + key] = med_of(key);
      log << std::left << std::setw(9) << model << std::setw(24) << name << std::right << std::setw(11)
          << fixed(med, 0) << std::setw(17)
          << (fixed(*std::min_element(v.begin(), v.end()), 0) + "-" +
              fixed(*std::max_element(v.begin(), v.end()), 0))
          << std::setw(10) << fixed(med / one, 2);
      if (s.contains("rank0")) {
        log << std::setw(10) << fixed(med_of("bytes_per_step") / 1e6, 2) << std::setw(11)
            << fixed(100 * med_of("comm_share"), 1) << std::setw(11)
            << fixed(med_of("a2a_bytes_per_step") / 1e6, 2) << std::setw(8)
            << fixed(100 * med_of("a2a_share"), 1) << std::setw(13)
            << fixed(med_of("grad_sync_ms_per_step"), 1) << std::setw(11)
            << (fixed(med_of("grad_buckets_overlapped_per_step"), 1) + "/" +
                std::to_string(s["rank0"][0].value("grad_buckets", 0)));
      }
      log << "\n";
    }
  }
  log << "(2 ranks x " << opt.threads / 2 << " thread(s) against 1 rank x " << opt.threads
      << " threads: the same cores. comm %: rank 0's time waiting on collectives; grad ms/step: the "
         "gradient all-reduce's wait after backward; overlap: buckets started during backward / buckets)\n";
  if (!opt.plot.empty()) {
    plot(result, opt.plot);
    log << "wrote " << opt.plot << "\n";
  }
  std::error_code ec;
  fs::remove_all(root, ec);
  return result;
}

}  // namespace moeforge
