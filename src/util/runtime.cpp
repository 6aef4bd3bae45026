#include "moeforge/util/runtime.h"

#include <dlfcn.h>
#include <sched.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

namespace moeforge {

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  int n = sched_getaffinity(0, sizeof(set), &set) == 0
              ? CPU_COUNT(&set)
              : static_cast<int>(std::thread::hardware_concurrency());
  return n > 0 ? n : 1;
}

int init_threads(int n) {
  const int cores = available_cores();
  if (n <= 0) n = cores;
  // More threads than a few per core only adds threads (10000 made ~100 a second, docs/reliability.md).
  const int most = kMaxThreadsPerCore * cores;
  if (n > most) {
    std::cerr << "moeforge: " << n << " threads asked for (--threads or train.threads) is more than "
              << kMaxThreadsPerCore << " x the " << cores << " cores this process may use; using " << most
              << "\n";
    n = most;
  }
  at::set_num_threads(n);
  return n;
}

namespace {

// Set by ensure_thread_wait_policies for the restarted process (and inherited by its children):
// MOEFORGE_BLAS_CHOICE is "auto-unchecked" between setting OPENBLAS_CORETYPE and its check, then "auto";
// "user", "none" or "fallback" otherwise. MOEFORGE_BLAS_CHOSEN is the core OpenBLAS had chosen itself,
// MOEFORGE_BLAS_REJECTED the core that failed its check.
constexpr const char* kChoiceVar = "MOEFORGE_BLAS_CHOICE";
constexpr const char* kChosenVar = "MOEFORGE_BLAS_CHOSEN";
constexpr const char* kRejectedVar = "MOEFORGE_BLAS_REJECTED";
// Test hooks for the automatic choice on a machine whose core OpenBLAS recognises (tests/test_cli_blas.cpp):
// MOEFORGE_BLAS_PRETEND_CORE=<name> makes the choice act as if OpenBLAS had chosen <name>,
// MOEFORGE_BLAS_PRETEND_FORCE=<name> forces <name> instead of blas_core_to_force's answer (Bulldozer's FMA4
// kernels die on SIGILL on other CPUs), MOEFORGE_BLAS_PRETEND_CHECK=wrong makes the check fail.
constexpr const char* kPretendCoreVar = "MOEFORGE_BLAS_PRETEND_CORE";
constexpr const char* kPretendForceVar = "MOEFORGE_BLAS_PRETEND_FORCE";
constexpr const char* kPretendCheckVar = "MOEFORGE_BLAS_PRETEND_CHECK";

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : fallback;
}

// Decides OPENBLAS_CORETYPE on the first start, or checks a forced core after the restart. True when the
// environment changed so that the libraries must be loaded again.
bool choose_blas_core() {
  const std::string choice = env_or(kChoiceVar, "");
  if (choice.empty()) {
    if (const char* user = std::getenv("OPENBLAS_CORETYPE")) {
      // Kept (a user's setting wins), but a core below the CPU can halve every matrix product: say so once,
      // before the restart (docs/performance.md, "BLAS kernel choice").
      if (const std::string w = user_blas_core_warning(read_cpu_features(), user); !w.empty())
        std::cerr << "moeforge: warning: " << w << "\n";
      setenv(kChoiceVar, "user", 1);
      return false;
    }
    const std::string chosen = env_or(kPretendCoreVar, openblas_core());
    std::string force = blas_core_to_force(read_cpu_features(), chosen);
    if (!force.empty()) force = env_or(kPretendForceVar, force);
    if (force.empty()) {
      setenv(kChoiceVar, "none", 1);
      return false;
    }
    setenv("OPENBLAS_CORETYPE", force.c_str(), 1);
    setenv(kChosenVar, chosen.c_str(), 1);
    setenv(kChoiceVar, "auto-unchecked", 1);
    return true;
  }
  if (choice != "auto-unchecked") return false;
  const std::string pretend = env_or(kPretendCheckVar, "");
  const bool right =
      passes_in_child([&pretend] { return pretend != "wrong" && blas_kernels_compute_right(); });
  if (right) {
    setenv(kChoiceVar, "auto", 1);
    return false;
  }
  const std::string forced = env_or("OPENBLAS_CORETYPE", "");
  std::cerr << "moeforge: warning: OpenBLAS core " << forced << " (set in place of "
            << env_or(kChosenVar, "?")
            << ", which is below what this CPU supports) failed the sgemm check against double precision "
               "or crashed; running with OpenBLAS's own choice instead. Set OPENBLAS_CORETYPE to choose a "
               "core yourself (docs/performance.md, \"BLAS kernel choice\").\n";
  unsetenv("OPENBLAS_CORETYPE");
  setenv(kRejectedVar, forced.c_str(), 1);
  setenv(kChoiceVar, "fallback", 1);
  return true;
}

}  // namespace

void ensure_thread_wait_policies(char** argv) {
  bool changed = false;
  for (const auto& [name, value] :
       {std::pair{"OMP_WAIT_POLICY", "PASSIVE"}, {"OPENBLAS_THREAD_TIMEOUT", "16"}})
    if (std::getenv(name) == nullptr && setenv(name, value, 1) == 0) changed = true;
  const std::string choice_before = env_or(kChoiceVar, "");
  if (choose_blas_core()) changed = true;
  if (!changed) return;
  execv("/proc/self/exe", argv);
  // exec failed: carry on with the libraries as loaded, and say so in the machine line.
  if (env_or(kChoiceVar, "") == "auto-unchecked") {
    unsetenv("OPENBLAS_CORETYPE");
    setenv(kChoiceVar, "none", 1);
  } else if (choice_before == "auto-unchecked") {
    // The rejected core is still loaded: keep saying so.
    setenv(kChoiceVar, "fallback-not-restarted", 1);
  }
}

CpuFeatures read_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return f;
  const unsigned max_leaf = a;
  char vendor[13];
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  vendor[12] = '\0';
  f.vendor = vendor;
  if (max_leaf < 1) return f;
  __cpuid(1, a, b, c, d);
  f.fma = (c >> 12) & 1;
  f.avx = (c >> 28) & 1;
  if ((c >> 27) & 1) {  // OSXSAVE: XGETBV is available and says which register state the OS saves
    uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    f.os_avx = (lo & 0x6) == 0x6;
    f.os_avx512 = f.os_avx && (lo & 0xe0) == 0xe0;
    f.os_amx = ((lo >> 17) & 3) == 3;
  }
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = (b >> 5) & 1;
    f.avx512f = (b >> 16) & 1;
    f.avx512dq = (b >> 17) & 1;
    f.avx512bw = (b >> 30) & 1;
    f.avx512vl = (b >> 31) & 1;
    f.amx_bf16 = (d >> 22) & 1;
    f.amx_tile = (d >> 24) & 1;
    if (a >= 1) {  // leaf 7's highest sub-leaf
      __cpuid_count(7, 1, a, b, c, d);
      f.avx512_bf16 = (a >> 5) & 1;
    }
  }
#endif
  return f;
}

std::string bf16_support(const CpuFeatures& f) {
  const bool avx512 = f.avx512_bf16 && f.avx512f && f.os_avx512;
  if (f.amx_tile && f.amx_bf16 && f.os_amx) return avx512 ? "AMX-BF16 + AVX512-BF16" : "AMX-BF16";
  return avx512 ? "AVX512-BF16" : "";
}

int cpu_vector_level(const CpuFeatures& f) {
  const bool avx2_fma = f.avx && f.avx2 && f.fma && f.os_avx;
  if (avx2_fma && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.os_avx512) return 3;
  if (avx2_fma) return 2;
  if (f.avx && f.os_avx) return 1;
  return 0;
}

int blas_core_level(const std::string& core) {
  // OpenBLAS 0.3.21's DYNAMIC_ARCH x86 cores (driver/others/dynamic.c), by the widest vectors their
  // single-precision kernels use.
  static const std::pair<const char*, int> kCores[] = {
      {"katmai", 0},        {"coppermine", 0},  {"northwood", 0},    {"prescott", 0},   {"banias", 0},
      {"atom", 0},          {"core2", 0},       {"penryn", 0},       {"dunnington", 0}, {"nehalem", 0},
      {"athlon", 0},        {"opteron", 0},     {"opteron_sse3", 0}, {"barcelona", 0},  {"nano", 0},
      {"bobcat", 0},        {"sandybridge", 1}, {"bulldozer", 1},    {"piledriver", 1}, {"steamroller", 1},
      {"excavator", 1},     {"haswell", 2},     {"zen", 2},          {"skylakex", 3},   {"cooperlake", 3},
      {"sapphirerapids", 3}};
  std::string lower = core;
  for (auto& ch : lower) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  for (const auto& [name, level] : kCores)
    if (lower == name) return level;
  return -1;
}

std::string user_blas_core_warning(const CpuFeatures& f, const std::string& user_core) {
  const int cpu = cpu_vector_level(f), core = blas_core_level(user_core);
  if (cpu < 2 || core < 0 || core >= cpu) return "";
  const std::string better = blas_core_to_force(f, user_core);
  return "OPENBLAS_CORETYPE=" + user_core + " (vector level " + std::to_string(core) +
         ") is below what this CPU supports (level " + std::to_string(cpu) +
         "); kept because it was set, but matrix products may run at half speed or less: unset it to let "
         "OpenBLAS and moeforge choose" +
         (better.empty() ? std::string() : ", or set " + better) + " (docs/performance.md)";
}

std::string blas_core_to_force(const CpuFeatures& f, const std::string& chosen) {
  const int have = blas_core_level(chosen), can = cpu_vector_level(f);
  if (have < 0 || can < 2 || have >= can) return "";
  if (can == 3) return "SkylakeX";
  return f.vendor == "AuthenticAMD" || f.vendor == "HygonGenuine" ? "Zen" : "Haswell";
}

std::string openblas_core() {
  using CoreName = char* (*)();
  auto fn = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  if (fn == nullptr) return "";
  const char* name = fn();
  return name != nullptr ? std::string(name) : std::string();
}

bool blas_kernels_compute_right() {
  // {m, k, n, A transposed}: one square block, odd sizes that leave partial register tiles at every edge,
  // a transposed operand (the other packing routine), and one large enough for OpenBLAS's threads.
  struct Shape {
    int64_t m, k, n;
    bool a_transposed;
  };
  const Shape shapes[] = {
      {64, 64, 64, false}, {67, 129, 33, false}, {33, 67, 129, true}, {96, 192, 160, false}};
  double phase = 0.0;
  for (const auto& s : shapes) {
    auto values = [&phase](int64_t rows, int64_t cols) {
      phase += 0.5;
      return at::sin(at::arange(rows * cols, at::kDouble) * 0.37 + phase)
          .reshape({rows, cols})
          .to(at::kFloat);
    };
    const at::Tensor a = s.a_transposed ? values(s.k, s.m).t() : values(s.m, s.k);
    const at::Tensor b = values(s.k, s.n);
    if (!sgemm_result_right(at::mm(a, b), a, b)) return false;
  }
  return true;
}

bool sgemm_result_right(const at::Tensor& got, const at::Tensor& a, const at::Tensor& b) {
  if (got.dim() != 2 || got.size(0) != a.size(0) || got.size(1) != b.size(1)) return false;
  // The reference uses the same float inputs, so only the product's rounding differs.
  const at::Tensor a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
  const at::Tensor want = at::mm(a64, b64), scale = at::mm(a64.abs(), b64.abs());
  // A float dot product of length k is within k * 2^-24 * sum |a_i b_i| of the exact value (any
  // summation order, with or without FMA); twice that leaves room without hiding a wrong kernel, whose
  // errors are of the order of the entries themselves.
  const double tol = 2.0 * double(a.size(1)) * std::ldexp(1.0, -24);
  return (got.to(at::kDouble) - want).abs().le(scale * tol + 1e-30).all().item<bool>();
}

bool passes_in_child(const std::function<bool()>& check) {
  std::cout.flush();
  std::cerr.flush();
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    bool ok = false;
    try {
      ok = check();
    } catch (...) {
      ok = false;
    }
    _exit(ok ? 0 : 1);  // no exit handlers or destructors of the parent's objects in the child
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return false;
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

int parallel_for_threads() {
  // Each range does enough work that a second thread, if there is one, gets a share.
  const int64_t n = 4 * std::max(at::get_num_threads(), 1);
  std::vector<std::thread::id> ids(static_cast<size_t>(n));
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      volatile double sink = 0;
      for (int k = 0; k < 200000; ++k) sink = sink + k;
      ids[static_cast<size_t>(i)] = std::this_thread::get_id();
    }
  });
  std::sort(ids.begin(), ids.end());
  return static_cast<int>(std::unique(ids.begin(), ids.end()) - ids.begin());
}

std::string describe_machine() {
  std::string model = "unknown CPU";
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  }
  std::ostringstream os;
  const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
  const char* blas_timeout = std::getenv("OPENBLAS_THREAD_TIMEOUT");
  os << model << ", " << at::get_num_threads() << " threads (parallel_for uses " << parallel_for_threads()
     << "), LibTorch " << TORCH_VERSION << ", OMP_WAIT_POLICY=" << (wait_policy ? wait_policy : "default")
     << ", OPENBLAS_THREAD_TIMEOUT=" << (blas_timeout ? blas_timeout : "default");
  const std::string core = openblas_core();
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  // Without ensure_thread_wait_policies (the tests, a library user) a set OPENBLAS_CORETYPE is the user's.
  const std::string choice = env_or(kChoiceVar, coretype != nullptr ? "user" : "none");
  os << ", " << (core.empty() ? "no OpenBLAS" : "OpenBLAS core " + core)
     << " (OPENBLAS_CORETYPE=" << (coretype ? coretype : "unset") << ", " << choice;
  if (choice == "auto") os << "; OpenBLAS chose " << env_or(kChosenVar, "?");
  if (choice.rfind("fallback", 0) == 0) os << "; " << env_or(kRejectedVar, "?") << " failed its check";
  os << ")";
  if (torch::cuda::is_available()) os << ", CUDA devices: " << torch::cuda::device_count();
  return os.str();
}

}  // namespace moeforge
