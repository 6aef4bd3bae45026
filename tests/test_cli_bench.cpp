// `moeforge bench --scaling` end to end (docs/performance.md, "Scaling"): it runs, writes its JSON with the
// three sweeps and their fitted exponents, and its PNG; `moeforge bench --dist` likewise. No timing is
// asserted: speed is measured by the bench itself (docs/performance.md), not by tests.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "interop_util.h"
#include "moeforge/util/runtime.h"

namespace moeforge {
namespace {

TEST(CliBench, ScalingQuickWritesSweepsExponentsAndPlot) {
  const std::string dir = test::fresh_dir("cli_bench_scaling");
  int rc = 0;
  const std::string out =
      test::run_capture(std::string(MOEFORGE_CLI) + " --threads 1 bench --scaling --quick --reps 1 --json " +
                            test::quote(dir + "/s.json") + " --plot " + test::quote(dir + "/s.png") + " 2>&1",
                        &rc);
  ASSERT_EQ(rc, 0) << out;
  std::ifstream in(dir + "/s.json");
  const auto j = nlohmann::json::parse(in);
  for (const char* var : {"T", "E", "K"}) {
    ASSERT_TRUE(j["sweeps"].contains(var)) << var;
    const auto& sw = j["sweeps"][var];
    ASSERT_EQ(sw["points"].size(), 2u) << var;
    for (const auto& p : sw["points"]) {
      EXPECT_GT(p["layer_ms"].get<double>(), 0.0);
      EXPECT_GT(p["route_ms"].get<double>(), 0.0);
      EXPECT_EQ(p["assignments"].get<int64_t>(), p["T"].get<int64_t>() * p["K"].get<int64_t>());
    }
    EXPECT_TRUE(std::isfinite(sw["layer_exponent"].get<double>())) << var;
    EXPECT_TRUE(std::isfinite(sw["route_exponent"].get<double>())) << var;
  }
  EXPECT_GT(std::filesystem::file_size(dir + "/s.png"), 1000u);
  EXPECT_NE(out.find("fitted growth"), std::string::npos) << out;
}

TEST(CliBench, ScalingOptionsAreCheckedNamingTheFlag) {
  int rc = 0;
  auto out = test::run_capture(std::string(MOEFORGE_CLI) + " bench --quick 2>&1", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("--quick"), std::string::npos) << out;
  out = test::run_capture(std::string(MOEFORGE_CLI) + " bench --scaling --train 2>&1", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("--scaling"), std::string::npos) << out;
}

// `moeforge bench --train` on the tests' tiny model: the bf16 GEMM rate is measured in the same run as the
// sgemm and reported beside it, with the CPU's bf16 support.
TEST(CliBench, TrainReportsTheBf16GemmRateBesideTheSgemm) {
  const std::string dir = test::fresh_dir("cli_bench_train");
  std::string cmd =
      std::string(MOEFORGE_CLI) + " bench --train --reps 1 --json " + test::quote(dir + "/t.json");
  for (auto& o : test::tiny_run_overrides("cli_bench_train"))
    if (o.rfind("train.steps", 0) != 0) cmd += " --set " + test::quote(o);
  cmd += " --set " + test::quote("moe.router=\"topk\"");
  int rc = 0;
  const std::string out = test::run_capture(cmd + " 2>&1", &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("bf16 GEMM 2048^3: "), std::string::npos) << out;
  std::ifstream in(dir + "/t.json");
  const auto j = nlohmann::json::parse(in);
  EXPECT_GT(j["sgemm_gflops"].get<double>(), 0.0);
  EXPECT_GT(j["bf16_gemm_gflops"].get<double>(), 0.0);
  EXPECT_EQ(j["cpu_bf16"].get<std::string>(), bf16_support(read_cpu_features()));
  // The bf16 variant runs where the CPU has native bf16, its share taken of the bf16 GEMM rate; the
  // float32 variants' shares stay of the sgemm. Routing flips: one share per MoE layer (2 here), in [0, 1].
  ASSERT_TRUE(j["route_flips_bf16"].is_array());
  EXPECT_EQ(j["route_flips_bf16"].size(), 2u);
  for (auto& f : j["route_flips_bf16"]) {
    EXPECT_GE(f.get<double>(), 0.0);
    EXPECT_LE(f.get<double>(), 1.0);
  }
  const auto& fused = j["variants"]["fused"];
  EXPECT_NEAR(fused["share_of_own_gemm"].get<double>(),
              fused["gflops"].get<double>() / j["sgemm_gflops"].get<double>(), 1e-9);
  if (bf16_support(read_cpu_features()).empty()) {
    EXPECT_FALSE(j["variants"].contains("bf16")) << j.dump();
  } else {
    const auto& b = j["variants"]["bf16"];
    EXPECT_EQ(b["precision"].get<std::string>(), "bf16");
    EXPECT_NEAR(b["share_of_own_gemm"].get<double>(),
                b["gflops"].get<double>() / j["bf16_gemm_gflops"].get<double>(), 1e-9);
    EXPECT_GT(j["bf16_speedup"].get<double>(), 0.0);
  }
}

// `moeforge bench --dist` end to end on the tests' tiny model: every setting runs as real ranks, and the
// figures come back from their metrics.jsonl and rank 0's dist.json. What is asserted is what the
// settings must differ in (bytes of the all-reduce, all-to-all only with expert parallelism, buckets
// started during backward only with the overlap), not speed.
TEST(CliBench, DistQuickRunsEverySettingAsRanksAndReadsTheirFigures) {
  const std::string dir = test::fresh_dir("cli_bench_dist");
  std::string cmd = std::string(MOEFORGE_CLI) +
                    " --threads 2 bench --dist --quick --reps 3 --rounds 1 --json " +
                    test::quote(dir + "/d.json") + " --plot " + test::quote(dir + "/d.png");
  for (auto& o : test::tiny_run_overrides("cli_bench_dist"))
    if (o.rfind("train.steps", 0) != 0 && o.rfind("train.threads", 0) != 0) cmd += " --set " + test::quote(o);
  cmd += " --set " + test::quote("moe.router=\"topk\"");  // the default MoCE needs more than 4 experts
  int rc = 0;
  const std::string out = test::run_capture(cmd + " 2>&1", &rc);
  ASSERT_EQ(rc, 0) << out;
  std::ifstream in(dir + "/d.json");
  const auto j = nlohmann::json::parse(in);
  ASSERT_EQ(j["models"].size(), 1u) << "--quick: the default model only";
  const auto& s = j["models"]["default"]["settings"];
  ASSERT_EQ(s.size(), 4u) << s.dump(2);
  EXPECT_EQ(s["1 rank"]["ratio_to_one_rank"].get<double>(), 1.0);
  EXPECT_FALSE(s["1 rank"].contains("rank0"));
  for (const char* name : {"2 ranks DP", "2 ranks DP, no overlap", "2 ranks EP"}) {
    ASSERT_TRUE(s.contains(name)) << name;
    const auto& d = s[name];
    EXPECT_EQ(d["world"].get<int>(), 2) << name;
    EXPECT_GT(d["median_tokens_per_s"].get<double>(), 0.0) << name;
    EXPECT_GT(d["median_bytes_per_step"].get<double>(), 0.0) << name;
    EXPECT_EQ(d["rank0"][0]["steps"].get<double>(), 3.0) << name;
  }
  EXPECT_EQ(s["2 ranks DP"]["median_a2a_bytes_per_step"].get<double>(), 0.0);
  EXPECT_GT(s["2 ranks EP"]["median_a2a_bytes_per_step"].get<double>(), 0.0);
  // Expert parallelism takes the experts' gradients out of the all-reduce.
  EXPECT_LT(s["2 ranks EP"]["median_bytes_per_step"].get<double>() -
                s["2 ranks EP"]["median_a2a_bytes_per_step"].get<double>(),
            s["2 ranks DP"]["median_bytes_per_step"].get<double>());
  EXPECT_GT(s["2 ranks DP"]["median_grad_buckets_overlapped_per_step"].get<double>(), 0.0);
  EXPECT_EQ(s["2 ranks DP, no overlap"]["median_grad_buckets_overlapped_per_step"].get<double>(), 0.0);
  EXPECT_GT(std::filesystem::file_size(dir + "/d.png"), 1000u);
}

TEST(CliBench, DistOptionsAreCheckedNamingTheFlag) {
  int rc = 0;
  auto out = test::run_capture(std::string(MOEFORGE_CLI) + " bench --rounds 2 2>&1", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("--rounds"), std::string::npos) << out;
  out = test::run_capture(std::string(MOEFORGE_CLI) + " bench --dist --train 2>&1", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("--dist"), std::string::npos) << out;
  out = test::run_capture(std::string(MOEFORGE_CLI) + " bench --dist --set train.steps=3 2>&1", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("train.steps"), std::string::npos) << out;
  out = test::run_capture(std::string(MOEFORGE_CLI) + " --threads 3 bench --dist 2>&1", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("--threads"), std::string::npos) << out;
}

}  // namespace
}  // namespace moeforge
