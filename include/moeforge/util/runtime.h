// Process-wide runtime set-up: LibTorch's thread count and a description of the machine for reports.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>

namespace moeforge {

// The cores this process may use (its CPU affinity).
int available_cores();
// At most this many LibTorch threads per available core: more only adds threads.
constexpr int kMaxThreadsPerCore = 4;
// Sets LibTorch's intra-op threads to `n`, or to the cores this process may use when n <= 0 (LibTorch
// defaults to 1 thread on some machines); more than kMaxThreadsPerCore x those cores is clamped to that,
// with a warning on stderr. Returns the count set.
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
//
// The same restart picks OpenBLAS's kernels (docs/performance.md, "BLAS kernel choice"): OpenBLAS 0.3.21
// does not recognise some CPUs (an AVX-512 Xeon with AMX) and falls back to its SSE3 "Prescott" kernels,
// 4-6x slower. Where the core it chose is below what the CPU supports (blas_core_to_force) and the user
// has not set OPENBLAS_CORETYPE, this sets it before the restart; the restarted process then checks a few
// small sgemms against double-precision products in a forked child (blas_kernels_compute_right) and, if
// they are wrong or the child dies (an illegal instruction), restarts once more without the setting and
// warns on stderr. MOEFORGE_BLAS_CHOICE records the outcome for describe_machine (auto, user, none,
// fallback) and keeps the restarts to at most two.
void ensure_thread_wait_policies(char** argv);

// The x86 features that decide OpenBLAS's kernels (cpuid leaves 1 and 7, and XGETBV for whether the OS
// saves the AVX / AVX-512 registers; all false elsewhere).
struct CpuFeatures {
  std::string vendor;  // cpuid leaf 0: "GenuineIntel", "AuthenticAMD", "HygonGenuine", ...
  bool avx = false, avx2 = false, fma = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
  bool os_avx = false;     // XCR0 has the SSE and AVX state (bits 1-2)
  bool os_avx512 = false;  // and the AVX-512 opmask and ZMM state (bits 5-7)
  // bfloat16 instructions (docs/performance.md, "bf16 on this CPU"): AVX512-BF16's dot products (cpuid leaf 7
  // sub-leaf 1, EAX bit 5), AMX's tiles and their bf16 products (leaf 7, EDX bits 24 and 22), and whether the
  // OS saves the tile state (XCR0 bits 17-18).
  bool avx512_bf16 = false, amx_tile = false, amx_bf16 = false, os_amx = false;
};
CpuFeatures read_cpu_features();

// The CPU's native bf16 instructions that the OS lets run: "AMX-BF16 + AVX512-BF16", "AVX512-BF16", or ""
// (none: a bf16 GEMM then converts to float32 and is no faster than sgemm).
std::string bf16_support(const CpuFeatures& f);

// Vector level of OpenBLAS kernels and of CPUs: 0 SSE only, 1 AVX, 2 AVX2 + FMA, 3 AVX-512 F/BW/DQ/VL.
int cpu_vector_level(const CpuFeatures& f);
// The level of an OpenBLAS core name as openblas_get_corename() spells it (any case); -1 for a name this
// table does not know (a newer OpenBLAS's core), which is never replaced.
int blas_core_level(const std::string& core);

// The OPENBLAS_CORETYPE a CPU with features `f` should run when OpenBLAS chose `chosen`: "" when the
// chosen core is as good as the CPU allows, unknown, or the CPU has less than AVX2 + FMA; otherwise
// "SkylakeX" for AVX-512 F/BW/DQ/VL, "Zen" for AVX2 + FMA on AMD and Hygon, "Haswell" for AVX2 + FMA
// elsewhere.
std::string blas_core_to_force(const CpuFeatures& f, const std::string& chosen);

// The warning for a user's OPENBLAS_CORETYPE below what the CPU supports (kept, since a user's setting
// wins, but said): "" when `user_core` is at the CPU's level or above, unknown, or the CPU has less than
// AVX2 + FMA; otherwise one line naming the core, the one moeforge would pick, and how to get it.
std::string user_blas_core_warning(const CpuFeatures& f, const std::string& user_core);

// openblas_get_corename() of the OpenBLAS in this process (looked up at run time, so that the build does
// not depend on which BLAS libblas.so.3 is), or "" when the process has no OpenBLAS.
std::string openblas_core();

// Float matrix products through at::mm (OpenBLAS's sgemm) on small square, odd and transposed shapes
// against the same products in double: true when every entry agrees to float rounding.
bool blas_kernels_compute_right();
// Whether `got` is the float product a @ b ([m, k] @ [k, n]) to float rounding, against double.
bool sgemm_result_right(const at::Tensor& got, const at::Tensor& a, const at::Tensor& b);

// Runs `check` in a forked child: true only when it returns true; false when it returns false, or the
// child dies on a signal (an illegal instruction, a segfault) or cannot be forked.
bool passes_in_child(const std::function<bool()>& check);

// How many threads one at::parallel_for over a few ranges of work actually used, from code compiled in
// this library: 1 where LibTorch has more threads means our objects were built without OpenMP (the
// parallel_for template then runs every range inline; see CMakeLists.txt).
int parallel_for_threads();

// "CPU model, N threads (parallel_for uses M), LibTorch version, OpenMP wait policy, OpenBLAS thread
// timeout, OpenBLAS core X (OPENBLAS_CORETYPE=..., auto|user|none|fallback)" for bench and report
// headers; with auto, also the core OpenBLAS had chosen itself.
std::string describe_machine();

}  // namespace moeforge
