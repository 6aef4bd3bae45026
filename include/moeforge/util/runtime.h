// Process-wide runtime set-up: LibTorch's thread count and a description of the machine for reports.
#pragma once

#include <string>

namespace moeforge {

// Sets LibTorch's intra-op threads to `n`, or to the cores this process may use when n <= 0 (LibTorch
// defaults to 1 thread on some machines). Returns the count set.
int init_threads(int n = 0);

// LibTorch's OpenMP threads spin for a while after every parallel region, while OpenBLAS's own pthreads
// (Debian's libopenblas0-pthread) need the same cores for the next GEMM: on the 2-core bench machine that
// oversubscription made every MoE layer variant, the dense FFN and the plain loop alike, 2-6x slower
// (docs/performance.md). libgomp reads OMP_WAIT_POLICY only when it loads, so if the user has not chosen
// one, this sets it to PASSIVE and restarts the process with the same arguments (execv of
// /proc/self/exe). Call first thing in main; it returns only when nothing had to be done or exec failed.
void ensure_openmp_wait_policy(char** argv);

// How many threads one at::parallel_for over a few ranges of work actually used, from code compiled in
// this library: 1 where LibTorch has more threads means our objects were built without OpenMP (the
// parallel_for template then runs every range inline; see CMakeLists.txt).
int parallel_for_threads();

// "CPU model, N threads (parallel_for uses M), LibTorch version, OpenMP wait policy" for bench and report
// headers.
std::string describe_machine();

}  // namespace moeforge
