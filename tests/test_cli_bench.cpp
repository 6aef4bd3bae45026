// `moeforge bench --scaling` end to end (docs/performance.md, "Scaling"): it runs, writes its JSON with the
// three sweeps and their fitted exponents, and its PNG. No timing is asserted: speed is measured by the
// bench itself (docs/performance.md), not by tests.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "interop_util.h"

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

}  // namespace
}  // namespace moeforge
