#include "moeforge/util/runtime.h"

#include <sched.h>
#include <torch/torch.h>

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
  os << model << ", " << at::get_num_threads() << " threads, LibTorch " << TORCH_VERSION;
  if (torch::cuda::is_available()) os << ", CUDA devices: " << torch::cuda::device_count();
  return os.str();
}

}  // namespace moeforge
