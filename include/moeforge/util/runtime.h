// Process-wide runtime set-up: LibTorch's thread count and a description of the machine for reports.
#pragma once

#include <string>

namespace moeforge {

// Sets LibTorch's intra-op threads to `n`, or to the cores this process may use when n <= 0 (LibTorch
// defaults to 1 thread on some machines). Returns the count set.
int init_threads(int n = 0);

// Two thread pools share the cores: LibTorch's OpenMP threads (and this library's kernels) and OpenBLAS's
// own pthreads (Debian's libopenblas0-pthread). Each spins for a while after its work, taking the cores
// the other needs next:
// - libgomp spins after every parallel region: on the 2-core bench machine that made every MoE layer
//   variant, the dense FFN and the plain loop alike, 2-6x slower. Fixed by OMP_WAIT_POLICY=PASSIVE.
// - OpenBLAS's workers spin with sched_yield for 2^28 cycles (~0.1 s) after every GEMM: the next
//   parallel region of our kernels then shares the second core with a yielding BLAS thread (decode bench:
//   T = 16 forward 4.2-4.7 ms after a BLAS call vs 2.8 ms without). OPENBLAS_THREAD_TIMEOUT=16 (2^16
//   cycles, ~20 us) still covers back-to-back GEMMs (training steps measured as fast as with 28; 4 made
//   them ~15% slower).
// Both are read only when the libraries load, so for each the user has not set, this sets it and
// restarts the process with the same arguments (execv of /proc/self/exe) (docs/performance.md). Call
// first thing in main; it returns only when nothing had to be done or exec failed.
void ensure_thread_wait_policies(char** argv);

// How many threads one at::parallel_for over a few ranges of work actually used, from code compiled in
// this library: 1 where LibTorch has more threads means our objects were built without OpenMP (the
// parallel_for template then runs every range inline; see CMakeLists.txt).
int parallel_for_threads();

// "CPU model, N threads (parallel_for uses M), LibTorch version, OpenMP wait policy, OpenBLAS thread
// timeout" for bench and report headers.
std::string describe_machine();

}  // namespace moeforge
