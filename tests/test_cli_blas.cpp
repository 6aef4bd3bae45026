// The built CLI's choice of OpenBLAS core, end to end (docs/performance.md, "BLAS kernel choice"):
// `moeforge info` runs through the same restart as every subcommand and prints the machine line, the
// CPU's vector level and the level of the core OpenBLAS runs with.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <regex>
#include <string>

#include "moeforge/util/runtime.h"

namespace moeforge {
namespace {

struct CliRun {
  int status = -1;
  std::string output;  // stdout and stderr
};

// Runs `moeforge info` with the given environment assignments and none of the variables that the
// choice reads inherited from the test's own environment.
CliRun run_info(const std::string& env) {
  const std::string cmd =
      std::string("env -u OPENBLAS_CORETYPE -u MOEFORGE_BLAS_CHOICE -u MOEFORGE_BLAS_CHOSEN ") +
      "-u MOEFORGE_BLAS_REJECTED -u MOEFORGE_BLAS_PRETEND_CORE -u MOEFORGE_BLAS_PRETEND_FORCE -u "
      "MOEFORGE_BLAS_PRETEND_CHECK " +
      env + " '" + MOEFORGE_CLI + "' info 2>&1";
  CliRun run;
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return run;
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), pipe)) > 0;) run.output.append(buf.data(), n);
  const int status = pclose(pipe);
  run.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

int level_after(const std::string& out, const std::string& prefix) {
  std::smatch m;
  if (!std::regex_search(out, m, std::regex(prefix + "[^\n]*\\(vector level (-?[0-9]+)\\)"))) return -2;
  return std::stoi(m[1]);
}

std::string core_of(const std::string& out) {
  std::smatch m;
  return std::regex_search(out, m, std::regex("openblas core: (\\S+)")) ? std::string(m[1]) : "";
}

int cpu_level() {
  return cpu_vector_level(read_cpu_features());
}

TEST(CliBlas, CoreIsNotAGenericFallbackOnAnAvx2Machine) {
  const CliRun run = run_info("");
  ASSERT_EQ(run.status, 0) << run.output;
  const int cpu = level_after(run.output, "cpu: "), core = level_after(run.output, "openblas core: ");
  ASSERT_EQ(cpu, cpu_level()) << run.output;
  if (core_of(run.output) == "none") GTEST_SKIP() << "this build's BLAS is not OpenBLAS";
  if (cpu < 2) GTEST_SKIP() << "no AVX2 + FMA: nothing better than OpenBLAS's choice";
  EXPECT_GE(core, cpu) << run.output;
  EXPECT_NE(run.output.find("machine: "), std::string::npos);
  EXPECT_NE(run.output.find(", OpenBLAS core " + core_of(run.output) + " (OPENBLAS_CORETYPE="),
            std::string::npos)
      << run.output;
}

TEST(CliBlas, UserCoreTypeWins) {
  const CliRun run = run_info("OPENBLAS_CORETYPE=Prescott");
  ASSERT_EQ(run.status, 0) << run.output;
  if (core_of(run.output) == "none") GTEST_SKIP() << "this build's BLAS is not OpenBLAS";
  EXPECT_NE(run.output.find("OpenBLAS core Prescott (OPENBLAS_CORETYPE=Prescott, user)"), std::string::npos)
      << run.output;
  // Kept, and said once when the CPU could do better.
  const bool better = cpu_vector_level(read_cpu_features()) >= 2;
  const auto first = run.output.find("warning: OPENBLAS_CORETYPE=Prescott");
  EXPECT_EQ(first != std::string::npos, better) << run.output;
  if (better) {
    EXPECT_EQ(run.output.find("warning: OPENBLAS_CORETYPE", first + 1), std::string::npos) << run.output;
  }
}

TEST(CliBlas, WeakCoreIsReplacedAndChecked) {
  if (cpu_level() < 2) GTEST_SKIP() << "no AVX2 + FMA";
  const std::string want = blas_core_to_force(read_cpu_features(), "Prescott");
  const CliRun run = run_info("MOEFORGE_BLAS_PRETEND_CORE=Prescott");
  ASSERT_EQ(run.status, 0) << run.output;
  if (core_of(run.output) == "none") GTEST_SKIP() << "this build's BLAS is not OpenBLAS";
  EXPECT_EQ(core_of(run.output), want) << run.output;
  EXPECT_NE(run.output.find("(OPENBLAS_CORETYPE=" + want + ", auto; OpenBLAS chose Prescott)"),
            std::string::npos)
      << run.output;
  EXPECT_EQ(run.output.find("warning"), std::string::npos) << run.output;
}

bool cpu_has_fma4() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("flags", 0) == 0) return (line + " ").find(" fma4 ") != std::string::npos;
  return false;
}

void expect_fallback(const CliRun& run, const std::string& forced, const std::string& own) {
  ASSERT_EQ(run.status, 0) << run.output;
  EXPECT_NE(run.output.find("moeforge: warning: OpenBLAS core " + forced), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("(OPENBLAS_CORETYPE=unset, fallback; " + forced + " failed its check)"),
            std::string::npos)
      << run.output;
  EXPECT_EQ(core_of(run.output), own) << "back to OpenBLAS's own choice\n" << run.output;
}

TEST(CliBlas, ForcedCoreThatCrashesIsDropped) {
  if (cpu_level() < 2) GTEST_SKIP() << "no AVX2 + FMA";
  if (cpu_has_fma4()) GTEST_SKIP() << "Bulldozer's FMA4 kernels run on this CPU";
  const std::string own = core_of(run_info("").output);
  if (own == "none") GTEST_SKIP() << "this build's BLAS is not OpenBLAS";
  // Bulldozer's kernels use FMA4, which no Intel CPU and no Zen has: the check dies on SIGILL.
  expect_fallback(run_info("MOEFORGE_BLAS_PRETEND_CORE=Prescott MOEFORGE_BLAS_PRETEND_FORCE=Bulldozer"),
                  "Bulldozer", own);
}

TEST(CliBlas, ForcedCoreThatComputesWrongIsDropped) {
  if (cpu_level() < 2) GTEST_SKIP() << "no AVX2 + FMA";
  const std::string own = core_of(run_info("").output);
  if (own == "none") GTEST_SKIP() << "this build's BLAS is not OpenBLAS";
  expect_fallback(run_info("MOEFORGE_BLAS_PRETEND_CORE=Prescott MOEFORGE_BLAS_PRETEND_CHECK=wrong"),
                  blas_core_to_force(read_cpu_features(), "Prescott"), own);
}

// `info` says which bf16 instructions run, as the CPU and the OS report them, and `--sgemm` times the bf16
// GEMM beside the float one.
TEST(CliBlas, InfoSaysBf16SupportAndTimesTheBf16Gemm) {
  const std::string cmd = std::string("'") + MOEFORGE_CLI + "' info --sgemm 128 --reps 1 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), pipe)) > 0;) out.append(buf.data(), n);
  EXPECT_EQ(pclose(pipe), 0) << out;
  const std::string bf16 = bf16_support(read_cpu_features());
  EXPECT_NE(out.find("bf16: " + (bf16.empty() ? std::string("none") : bf16)), std::string::npos) << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("bf16 gemm 128\\^3: ([0-9.]+) GFLOP/s"))) << out;
  EXPECT_GT(std::stod(m[1]), 0.0) << out;
}

TEST(CliBlas, InfoRejectsRepsWithoutSgemm) {
  const std::string cmd = std::string("'") + MOEFORGE_CLI + "' info --reps 3 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), pipe)) > 0;) out.append(buf.data(), n);
  EXPECT_NE(pclose(pipe), 0);
  EXPECT_NE(out.find("--reps: applies only with --sgemm"), std::string::npos) << out;
}

}  // namespace
}  // namespace moeforge
