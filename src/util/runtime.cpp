#include "moeforge/util/runtime.h"

#include <sched.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

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

void ensure_openmp_wait_policy(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: then carry on with the default policy
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
  os << model << ", " << at::get_num_threads() << " threads, LibTorch " << TORCH_VERSION
     << ", OMP_WAIT_POLICY=" << (wait_policy ? wait_policy : "default");
  if (torch::cuda::is_available()) os << ", CUDA devices: " << torch::cuda::device_count();
  return os.str();
}

}  // namespace moeforge
