// Process-wide runtime set-up: LibTorch's thread count and a description of the machine for reports.
#pragma once

#include <string>

namespace moeforge {

// Sets LibTorch's intra-op threads to `n`, or to the cores this process may use when n <= 0 (LibTorch
// defaults to 1 thread on some machines). Returns the count set.
int init_threads(int n = 0);

// "CPU model, N cores, LibTorch version" for bench and report headers.
std::string describe_machine();

}  // namespace moeforge
