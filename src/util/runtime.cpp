#include "moeforge/util/runtime.h"

#include <sched.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

namespace moeforge {

int init_threads(int n) {
  if (n <= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
      n = CPU_COUNT(&set);
    else
      n = static_cast<int>(std::thread::hardware_concurrency());
    if (n <= 0) n = 1;
  }
  at::set_num_threads(n);
  return n;
}

void ensure_thread_wait_policies(char** argv) {
  bool changed = false;
  for (const auto& [name, value] :
       {std::pair{"OMP_WAIT_POLICY", "PASSIVE"}, {"OPENBLAS_THREAD_TIMEOUT", "16"}})
    if (std::getenv(name) == nullptr && setenv(name, value, 1) == 0) changed = true;
  if (changed) execv("/proc/self/exe", argv);  // returns only on failure: then carry on with the defaults
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
  if (torch::cuda::is_available()) os << ", CUDA devices: " << torch::cuda::device_count();
  return os.str();
}

}  // namespace moeforge
