// Process runtime checks: our own objects must run at::parallel_for on more than one thread (they did
// not while the library was compiled without OpenMP, and every kernel glue loop silently ran serially),
// and the choice of OpenBLAS core from the CPU's features (docs/performance.md, "BLAS kernel choice").
#include <gtest/gtest.h>
#include <signal.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "moeforge/util/runtime.h"

namespace moeforge {
namespace {

TEST(Runtime, ParallelForInTheLibraryUsesSeveralThreads) {
  if (std::thread::hardware_concurrency() < 2) GTEST_SKIP() << "one core: nothing to split";
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  EXPECT_EQ(parallel_for_threads(), 2);
  at::set_num_threads(1);
  EXPECT_EQ(parallel_for_threads(), 1);
  at::set_num_threads(before);
}

CpuFeatures avx2_cpu(const std::string& vendor) {
  CpuFeatures f;
  f.vendor = vendor;
  f.avx = f.avx2 = f.fma = f.os_avx = true;
  return f;
}

CpuFeatures avx512_cpu(const std::string& vendor) {
  CpuFeatures f = avx2_cpu(vendor);
  f.avx512f = f.avx512bw = f.avx512dq = f.avx512vl = f.os_avx512 = true;
  return f;
}

// The bf16 features read from cpuid agree with what the kernel reports in /proc/cpuinfo (which lists
// avx512_bf16 and amx_bf16 only when the CPU has them and the kernel enabled their state).
TEST(CpuFeatures, Bf16FlagsAgreeWithTheKernel) {
  std::ifstream in("/proc/cpuinfo");
  std::string line, flags;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) {
      flags = line.substr(line.find(':') + 1) + " ";
      break;
    }
  if (flags.empty()) GTEST_SKIP() << "no /proc/cpuinfo flags line";
  const CpuFeatures f = read_cpu_features();
  const bool kernel_bf16 = flags.find(" avx512_bf16 ") != std::string::npos;
  EXPECT_EQ(f.avx512_bf16 && f.os_avx512, kernel_bf16) << flags;
  if (flags.find(" amx_bf16 ") != std::string::npos) {
    EXPECT_TRUE(f.amx_bf16 && f.amx_tile) << flags;
  }
  // bf16_support names what runs: nothing on a CPU without either.
  EXPECT_EQ(bf16_support(f).empty(),
            !(f.avx512_bf16 && f.os_avx512) && !(f.amx_bf16 && f.amx_tile && f.os_amx));
}

TEST(BlasCore, VectorLevelOfCpus) {
  EXPECT_EQ(cpu_vector_level(CpuFeatures{}), 0);
  CpuFeatures sandy;
  sandy.avx = sandy.os_avx = true;
  EXPECT_EQ(cpu_vector_level(sandy), 1);
  EXPECT_EQ(cpu_vector_level(avx2_cpu("GenuineIntel")), 2);
  EXPECT_EQ(cpu_vector_level(avx512_cpu("GenuineIntel")), 3);
  // AVX2 without FMA, or AVX without the OS saving YMM state, is not usable for those kernels.
  CpuFeatures no_fma = avx2_cpu("GenuineIntel");
  no_fma.fma = false;
  EXPECT_EQ(cpu_vector_level(no_fma), 1);
  CpuFeatures no_os = avx512_cpu("GenuineIntel");
  no_os.os_avx = no_os.os_avx512 = false;
  EXPECT_EQ(cpu_vector_level(no_os), 0);
  // Knights Landing: AVX-512F without BW/DQ/VL, which SkylakeX's kernels use.
  CpuFeatures knl = avx2_cpu("GenuineIntel");
  knl.avx512f = knl.os_avx512 = true;
  EXPECT_EQ(cpu_vector_level(knl), 2);
  // AVX-512 the OS does not save (a VM that masks XCR0's ZMM bits).
  CpuFeatures masked = avx512_cpu("GenuineIntel");
  masked.os_avx512 = false;
  EXPECT_EQ(cpu_vector_level(masked), 2);
}

TEST(BlasCore, LevelOfOpenBlasCoreNames) {
  for (const char* weak : {"Prescott", "Katmai", "Core2", "Nehalem", "Barcelona", "Atom", "Opteron_SSE3"})
    EXPECT_EQ(blas_core_level(weak), 0) << weak;
  EXPECT_EQ(blas_core_level("Sandybridge"), 1);
  EXPECT_EQ(blas_core_level("Haswell"), 2);
  EXPECT_EQ(blas_core_level("Zen"), 2);
  EXPECT_EQ(blas_core_level("SkylakeX"), 3);
  EXPECT_EQ(blas_core_level("Cooperlake"), 3);
  EXPECT_EQ(blas_core_level("SapphireRapids"), 3);
  EXPECT_EQ(blas_core_level("PRESCOTT"), 0) << "any case";
  EXPECT_EQ(blas_core_level(""), -1);
  EXPECT_EQ(blas_core_level("NeoverseN1"), -1);
}

TEST(BlasCore, WeakCoreOnAvx512CpuBecomesSkylakeX) {
  // The issue-11 machine: an AVX-512 Xeon on which OpenBLAS 0.3.21 falls back to Prescott.
  EXPECT_EQ(blas_core_to_force(avx512_cpu("GenuineIntel"), "Prescott"), "SkylakeX");
  EXPECT_EQ(blas_core_to_force(avx512_cpu("GenuineIntel"), "Haswell"), "SkylakeX");
  EXPECT_EQ(blas_core_to_force(avx512_cpu("GenuineIntel"), "Sandybridge"), "SkylakeX");
  // Zen 4 has AVX-512 F/BW/DQ/VL too: SkylakeX's kernels, not Zen's AVX2 ones.
  EXPECT_EQ(blas_core_to_force(avx512_cpu("AuthenticAMD"), "Zen"), "SkylakeX");
  EXPECT_EQ(blas_core_to_force(avx512_cpu("AuthenticAMD"), "Barcelona"), "SkylakeX");
}

TEST(BlasCore, WeakCoreOnAvx2CpuBecomesHaswellOrZen) {
  EXPECT_EQ(blas_core_to_force(avx2_cpu("GenuineIntel"), "Nehalem"), "Haswell");
  EXPECT_EQ(blas_core_to_force(avx2_cpu("GenuineIntel"), "Prescott"), "Haswell");
  EXPECT_EQ(blas_core_to_force(avx2_cpu("AuthenticAMD"), "Barcelona"), "Zen");
  EXPECT_EQ(blas_core_to_force(avx2_cpu("HygonGenuine"), "Prescott"), "Zen");
  EXPECT_EQ(blas_core_to_force(avx2_cpu("CentaurHauls"), "Nano"), "Haswell");
  CpuFeatures masked = avx512_cpu("GenuineIntel");
  masked.os_avx512 = false;
  EXPECT_EQ(blas_core_to_force(masked, "Prescott"), "Haswell") << "the OS does not save ZMM registers";
}

TEST(BlasCore, GoodOrUnknownCoreIsKept) {
  EXPECT_EQ(blas_core_to_force(avx512_cpu("GenuineIntel"), "SkylakeX"), "");
  EXPECT_EQ(blas_core_to_force(avx512_cpu("AuthenticAMD"), "Cooperlake"), "");
  EXPECT_EQ(blas_core_to_force(avx512_cpu("GenuineIntel"), "SapphireRapids"), "");
  EXPECT_EQ(blas_core_to_force(avx2_cpu("AuthenticAMD"), "Zen"), "");
  EXPECT_EQ(blas_core_to_force(avx2_cpu("AuthenticAMD"), "Haswell"), "") << "the same AVX2 kernels";
  // A core a newer OpenBLAS names, or no OpenBLAS at all: never overridden.
  EXPECT_EQ(blas_core_to_force(avx512_cpu("GenuineIntel"), "Zen4"), "");
  EXPECT_EQ(blas_core_to_force(avx512_cpu("GenuineIntel"), ""), "");
  // A CPU without AVX2 + FMA gains nothing from a forced core.
  CpuFeatures sandy;
  sandy.vendor = "GenuineIntel";
  sandy.avx = sandy.os_avx = true;
  EXPECT_EQ(blas_core_to_force(sandy, "Prescott"), "");
  EXPECT_EQ(blas_core_to_force(CpuFeatures{}, "Katmai"), "");
}

// A user's OPENBLAS_CORETYPE is kept but, below the CPU, warned about: this session's Zen 5 machine came with
// OPENBLAS_CORETYPE=Haswell in its environment, which halves its sgemm (docs/performance.md).
TEST(BlasCore, UserCoreBelowTheCpuIsWarnedAbout) {
  const std::string w = user_blas_core_warning(avx512_cpu("AuthenticAMD"), "Haswell");
  EXPECT_NE(w.find("OPENBLAS_CORETYPE=Haswell"), std::string::npos) << w;
  EXPECT_NE(w.find("SkylakeX"), std::string::npos) << w;
  EXPECT_NE(user_blas_core_warning(avx2_cpu("GenuineIntel"), "Prescott"), "");
  EXPECT_EQ(user_blas_core_warning(avx512_cpu("GenuineIntel"), "SkylakeX"), "");
  EXPECT_EQ(user_blas_core_warning(avx2_cpu("AuthenticAMD"), "Zen"), "");
  EXPECT_EQ(user_blas_core_warning(avx512_cpu("GenuineIntel"), "Zen4"), "") << "unknown: no opinion";
  EXPECT_EQ(user_blas_core_warning(CpuFeatures{}, "Prescott"), "") << "nothing better to run";
}

TEST(BlasCore, CpuidAgreesWithProcCpuinfo) {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::set<std::string> flags;
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("flags", 0) == 0) {
      std::istringstream words(line.substr(line.find(':') + 1));
      for (std::string w; words >> w;) flags.insert(w);
      break;
    }
  if (flags.empty()) GTEST_SKIP() << "no flags line in /proc/cpuinfo";
  const CpuFeatures f = read_cpu_features();
  EXPECT_EQ(f.avx, flags.count("avx") == 1);
  EXPECT_EQ(f.avx2, flags.count("avx2") == 1);
  EXPECT_EQ(f.fma, flags.count("fma") == 1);
  EXPECT_EQ(f.avx512f, flags.count("avx512f") == 1);
  EXPECT_EQ(f.avx512bw, flags.count("avx512bw") == 1);
  EXPECT_EQ(f.avx512dq, flags.count("avx512dq") == 1);
  EXPECT_EQ(f.avx512vl, flags.count("avx512vl") == 1);
  EXPECT_FALSE(f.vendor.empty());
}

TEST(BlasCore, SgemmCheckPassesWithTheLoadedKernels) {
  EXPECT_TRUE(blas_kernels_compute_right());
}

TEST(BlasCore, SgemmCheckAcceptsRoundingAndRejectsWrongProducts) {
  const auto a = at::sin(at::arange(67 * 129, at::kFloat) * 0.37).reshape({67, 129});
  const auto b = at::cos(at::arange(129 * 33, at::kFloat) * 0.21).reshape({129, 33});
  const auto right = at::mm(a, b);
  EXPECT_TRUE(sgemm_result_right(right, a, b));
  // The same product summed in another order (two halves of k, then added): a different float rounding.
  const auto halves =
      at::mm(a.narrow(1, 0, 64), b.narrow(0, 0, 64)) + at::mm(a.narrow(1, 64, 65), b.narrow(0, 64, 65));
  EXPECT_TRUE(sgemm_result_right(halves, a, b));
  // What broken kernels produce: one entry off by 1%, a missing k slice, a shape mismatch, NaN.
  auto one_off = right.clone();
  one_off[5][7] = one_off[5][7] * 1.01 + 1e-3;
  EXPECT_FALSE(sgemm_result_right(one_off, a, b));
  EXPECT_FALSE(sgemm_result_right(at::mm(a.narrow(1, 0, 128), b.narrow(0, 0, 128)), a, b));
  EXPECT_FALSE(sgemm_result_right(right.t().contiguous(), a, b));
  auto nan = right.clone();
  nan[0][0] = std::nan("");
  EXPECT_FALSE(sgemm_result_right(nan, a, b));
}

TEST(BlasCore, ChildCheckReportsResultAndCrashes) {
  EXPECT_TRUE(passes_in_child([] { return true; }));
  EXPECT_FALSE(passes_in_child([] { return false; }));
  EXPECT_FALSE(passes_in_child([]() -> bool { throw std::runtime_error("thrown in the child"); }));
  EXPECT_FALSE(passes_in_child([] {
    raise(SIGILL);  // what a kernel the CPU cannot run does
    return true;
  }));
  EXPECT_TRUE(passes_in_child([] { return blas_kernels_compute_right(); }));
}

TEST(BlasCore, MachineLineNamesTheCore) {
  const std::string line = describe_machine();
  if (openblas_core().empty()) GTEST_SKIP() << "no OpenBLAS in this process";
  EXPECT_NE(line.find("OpenBLAS core " + openblas_core() + " (OPENBLAS_CORETYPE="), std::string::npos)
      << line;
}

}  // namespace
}  // namespace moeforge
