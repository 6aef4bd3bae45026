// bf16 matrix products (train.precision = "bf16"; layer/precision.h, docs/performance.md "bf16 training"):
// the fused MoE function's bf16 path and the plain experts under the bf16 guard against float64 references
// within bf16's bounds, linear_mp's rounding, the CPU check, and training in bf16 (the loss falls, resume is
// bit-identical, an fp32 checkpoint resumes in bf16).
#include <cmath>
#include <filesystem>

#include "moeforge/config/run_config.h"
#include "moeforge/layer/dispatch.h"
#include "moeforge/layer/fused_moe.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/layer/precision.h"
#include "moeforge/model/attention_core.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

// The machine's bf16 products are what these tests exercise; without native bf16 LibTorch still computes
// them (converted), so the numerics tests run everywhere, and only the CPU check differs.

struct Case {
  int64_t T, C, F, E, K;
  ExpertAct act;
};

struct Grads {
  torch::Tensor y, dx, dgate, dw_up, dw_down, dw_gate;
};

// One fused (or plain-loop) forward and backward in `dtype` from the same float64 draws: x, gates, weights
// and the output gradient are drawn in float64 and rounded once to `dtype`.
Grads run(const Case& c, torch::ScalarType dtype, bool fused, bool bf16, const torch::Tensor& experts) {
  torch::manual_seed(11);
  auto d = torch::TensorOptions().dtype(torch::kDouble);
  auto x64 = torch::randn({c.T, c.C}, d);
  auto g64 = torch::rand({c.T, c.K}, d).add_(0.1);
  auto wg64 = torch::randn({c.E, c.F, c.C}, d) / std::sqrt(double(c.C));
  auto wu64 = torch::randn({c.E, c.F, c.C}, d) / std::sqrt(double(c.C));
  auto wd64 = torch::randn({c.E, c.C, c.F}, d) / std::sqrt(double(c.F));
  auto gy64 = torch::randn({c.T, c.C}, d);
  auto leaf = [&](const torch::Tensor& t) { return t.to(dtype).requires_grad_(); };
  auto x = leaf(x64), gate = leaf(g64), w_up = leaf(wu64), w_down = leaf(wd64);
  auto w_gate = c.act == ExpertAct::kSwiGLU ? leaf(wg64) : torch::Tensor();
  ExpertWeights w{c.act, w_gate, w_up, w_down};
  auto plan = build_plan_from_choices(experts, {}, {}, gate, c.E, 0);
  MatmulPrecisionGuard guard(bf16 ? MatmulPrecision::kBFloat16 : MatmulPrecision::kFloat32);
  auto y = fused ? fused_moe(x, plan, w, nullptr) : moe_plain_loop(x, plan, w);
  y.backward(gy64.to(dtype));
  return {y.detach(),  x.grad(),      gate.grad(),
          w_up.grad(), w_down.grad(), w_gate.defined() ? w_gate.grad() : torch::Tensor()};
}

// ||a - ref|| / ||ref|| (Frobenius), in float64.
double rel_err(const torch::Tensor& a, const torch::Tensor& ref) {
  auto r = ref.to(torch::kDouble);
  return (a.to(torch::kDouble) - r).norm().item<double>() / r.norm().item<double>();
}

// bf16 keeps 8 significant bits: a value rounds with relative error at most u = 2^-9. Each product here
// rounds both operands (2u) and its output (u); an expert chains two products and an activation, and
// backward a third product on top, so an element's error is a few u; summed over a whole tensor the
// rounding errors are independent and the Frobenius error stays near u. Bound: 8u = 2^-6 (~1.6%), with
// room for the chain but far below any wrong row, expert or gate (errors of O(1)).
constexpr double kBf16Bound = 1.0 / 64;
// And the bf16 path must really round: float32 arithmetic on the same inputs errs ~1e-7, so an error
// below u / 64 would mean the products ran in float32.
constexpr double kRoundedAtLeast = 1.0 / 512 / 64;

void expect_bf16_close(const Case& c, bool fused) {
  torch::manual_seed(c.T * 7 + c.E);
  auto probs = torch::arange(1, c.E + 1, torch::kDouble).pow(-1.0);  // skewed loads, some experts empty
  auto experts = torch::multinomial(probs.expand({c.T, c.E}), c.K, false);
  const auto ref = run(c, torch::kDouble, /*fused=*/false, /*bf16=*/false, experts);
  const auto got = run(c, torch::kFloat, fused, /*bf16=*/true, experts);
  const std::vector<std::pair<const char*, std::pair<torch::Tensor, torch::Tensor>>> pairs = {
      {"y", {got.y, ref.y}},
      {"dx", {got.dx, ref.dx}},
      {"dgate", {got.dgate, ref.dgate}},
      {"dw_up", {got.dw_up, ref.dw_up}},
      {"dw_down", {got.dw_down, ref.dw_down}}};
  for (const auto& [name, p] : pairs) {
    const double e = rel_err(p.first, p.second);
    EXPECT_LT(e, kBf16Bound) << name;
    EXPECT_GT(e, kRoundedAtLeast) << name << ": no bf16 rounding seen";
  }
  if (c.act == ExpertAct::kSwiGLU) {
    EXPECT_LT(rel_err(got.dw_gate, ref.dw_gate), kBf16Bound) << "dw_gate";
  }
}

TEST(Bf16, FusedMoEMatchesFloat64WithinBf16Bounds) {
  // Row counts that are and are not multiples of the padded layout's 32 (grouped_ops.h), empty experts.
  for (const Case& c :
       {Case{96, 32, 48, 6, 2, ExpertAct::kSwiGLU}, Case{257, 64, 40, 8, 2, ExpertAct::kSwiGLU},
        Case{130, 32, 48, 5, 1, ExpertAct::kGELU}}) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " E=" + std::to_string(c.E));
    expect_bf16_close(c, /*fused=*/true);
  }
}

TEST(Bf16, PlainExpertsFollowThePrecision) {
  expect_bf16_close(Case{96, 32, 48, 6, 2, ExpertAct::kSwiGLU}, /*fused=*/false);
}

// Without the guard the fused path is float32 exactly as before: its error is float32's.
TEST(Bf16, NoGuardMeansFloat32) {
  const Case c{96, 32, 48, 6, 2, ExpertAct::kSwiGLU};
  torch::manual_seed(5);
  auto experts = torch::multinomial(torch::ones({c.T, c.E}, torch::kDouble), c.K, false);
  const auto ref = run(c, torch::kDouble, false, false, experts);
  const auto got = run(c, torch::kFloat, true, false, experts);
  EXPECT_LT(rel_err(got.y, ref.y), 1e-5);  // float32: ~1e-7 per element
  EXPECT_LT(rel_err(got.dw_up, ref.dw_up), 1e-5);
}

// Inference (no autograd) takes the same bf16 forward.
TEST(Bf16, NoGradForwardEqualsTheAutogradOne) {
  const Case c{257, 64, 40, 8, 2, ExpertAct::kSwiGLU};
  torch::manual_seed(9);
  auto experts = torch::multinomial(torch::ones({c.T, c.E}, torch::kDouble), c.K, false);
  const auto with_grad = run(c, torch::kFloat, true, true, experts);
  torch::manual_seed(11);
  auto d = torch::TensorOptions().dtype(torch::kDouble);
  auto x = torch::randn({c.T, c.C}, d).to(torch::kFloat);
  auto g = torch::rand({c.T, c.K}, d).add_(0.1).to(torch::kFloat);
  auto wg = (torch::randn({c.E, c.F, c.C}, d) / std::sqrt(double(c.C))).to(torch::kFloat);
  auto wu = (torch::randn({c.E, c.F, c.C}, d) / std::sqrt(double(c.C))).to(torch::kFloat);
  auto wd = (torch::randn({c.E, c.C, c.F}, d) / std::sqrt(double(c.F))).to(torch::kFloat);
  torch::NoGradGuard ng;
  MatmulPrecisionGuard guard(MatmulPrecision::kBFloat16);
  auto plan = build_plan_from_choices(experts, {}, {}, g, c.E, 0);
  auto y = fused_moe(x, plan, ExpertWeights{ExpertAct::kSwiGLU, wg, wu, wd}, nullptr);
  EXPECT_TRUE(torch::equal(y, with_grad.y));
}

// The attention core under the guard: output and q, k, v gradients against float64 within bf16's bounds
// (two products, each rounding its operands and output; the softmax between them in float32), and rounded.
TEST(Bf16, AttentionCoreMatchesFloat64WithinBf16Bounds) {
  torch::manual_seed(8);
  auto d = torch::TensorOptions().dtype(torch::kDouble);
  auto q64 = torch::randn({2, 3, 40, 16}, d), k64 = torch::randn({2, 3, 40, 16}, d);
  auto v64 = torch::randn({2, 3, 40, 16}, d), g64 = torch::randn({2, 3, 40, 16}, d);
  auto grads = [&](torch::ScalarType t, bool bf16) {
    auto leaf = [&](const torch::Tensor& x) { return x.to(t).detach().requires_grad_(); };
    auto q = leaf(q64), k = leaf(k64), v = leaf(v64);
    MatmulPrecisionGuard guard(bf16 ? MatmulPrecision::kBFloat16 : MatmulPrecision::kFloat32);
    auto y = t == torch::kDouble ? causal_attention_reference(q, k, v) : causal_attention(q, k, v);
    y.backward(g64.to(t));
    return std::vector<torch::Tensor>{y.detach(), q.grad(), k.grad(), v.grad()};
  };
  const auto ref = grads(torch::kDouble, false), got = grads(torch::kFloat, true);
  const char* names[] = {"y", "dq", "dk", "dv"};
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = rel_err(got[i], ref[i]);
    EXPECT_LT(e, kBf16Bound) << names[i];
    EXPECT_GT(e, kRoundedAtLeast) << names[i] << ": no bf16 rounding seen";
  }
}

TEST(Bf16, LinearRoundsOperandsOnlyUnderTheGuard) {
  torch::manual_seed(2);
  auto x = torch::randn({5, 7, 64}), w = torch::randn({24, 64}), b = torch::randn({24});
  auto want16 =
      torch::linear(x.to(torch::kBFloat16), w.to(torch::kBFloat16), b.to(torch::kBFloat16)).to(torch::kFloat);
  EXPECT_TRUE(torch::equal(linear_mp(x, w), torch::matmul(x, w.t())));
  {
    MatmulPrecisionGuard guard(MatmulPrecision::kBFloat16);
    EXPECT_EQ(matmul_precision(), MatmulPrecision::kBFloat16);
    auto y = linear_mp(x, w, b);
    EXPECT_EQ(y.scalar_type(), torch::kFloat);
    EXPECT_TRUE(torch::equal(y, want16));
    // float64 activations are never narrowed (the golden tests run in float64).
    auto x64 = x.to(torch::kDouble), w64 = w.to(torch::kDouble);
    EXPECT_TRUE(torch::equal(linear_mp(x64, w64), torch::matmul(x64, w64.t())));
  }
  EXPECT_EQ(matmul_precision(), MatmulPrecision::kFloat32);  // the guard restored it
}

TEST(Bf16, ConfigAndCpuChecks) {
  test::expect_config_error(
      [] {
        load_run_config_text("", "test", test::tiny_run_overrides("prec", {"train.precision=\"fp16\""}));
      },
      "train.precision");
  TrainConfig tc;
  tc.precision = "bf16";
  CpuFeatures none;  // no AVX512-BF16, no AMX: a clear error, not a slow emulation
  test::expect_config_error([&] { run_precision(tc, none); }, "train.precision");
  CpuFeatures avx512;
  avx512.avx512f = avx512.os_avx512 = avx512.avx512_bf16 = true;
  std::string line;
  EXPECT_EQ(run_precision(tc, avx512, &line), MatmulPrecision::kBFloat16);
  EXPECT_NE(line.find("AVX512-BF16"), std::string::npos) << line;
  tc.precision = "fp32";
  EXPECT_EQ(run_precision(tc, none), MatmulPrecision::kFloat32);
}

TrainOptions opts(const std::string& name) {
  TrainOptions t;
  t.out_dir = (fs::path(::testing::TempDir()) / ("moeforge_bf16_" + name)).string();
  fs::remove_all(t.out_dir);
  t.progress = false;
  return t;
}

bool cpu_has_bf16() {
  return !bf16_support(read_cpu_features()).empty();
}

// Training in bf16 learns, and a resumed bf16 run continues bit-identically (checkpoints hold float32
// master weights; the bf16 copies are made afresh every step).
TEST(Bf16, TrainingLearnsAndResumesExactly) {
  if (!cpu_has_bf16()) GTEST_SKIP() << "this CPU has no native bf16: train.precision = \"bf16\" is refused";
  std::ostringstream log;
  auto cfg = load_run_config_text(
      "", "test",
      test::tiny_run_overrides("bf16", {"train.steps=8", "moe.noisy=true", "train.precision=\"bf16\""}));
  auto straight = train_model(cfg, opts("straight"), log);
  EXPECT_NE(log.str().find("precision: bf16"), std::string::npos) << log.str();
  auto o = opts("halves");
  o.stop_after = 4;
  auto first = train_model(cfg, o, log);
  auto o2 = o;
  o2.stop_after = 0;
  o2.resume = (fs::path(o.out_dir) / "checkpoints").string();
  auto second = train_model(cfg, o2, log);
  std::vector<double> joined = first.step_losses;
  joined.insert(joined.end(), second.step_losses.begin(), second.step_losses.end());
  ASSERT_EQ(joined.size(), straight.step_losses.size());
  for (size_t i = 0; i < joined.size(); ++i)
    EXPECT_EQ(joined[i], straight.step_losses[i]) << "step " << i + 1;
  // The same run in fp32 from the same seed: the first step's loss agrees to bf16's rounding (same weights,
  // same batch); the runs then drift apart, as any two precisions do.
  auto cfg32 =
      load_run_config_text("", "test", test::tiny_run_overrides("bf16", {"train.steps=8", "moe.noisy=true"}));
  auto fp32 = train_model(cfg32, opts("fp32"), log);
  EXPECT_NEAR(fp32.step_losses.front(), straight.step_losses.front(), 0.02 * fp32.step_losses.front());
  EXPECT_NE(fp32.step_losses.front(), straight.step_losses.front());
}

// An fp32 run's checkpoint resumes in bf16 (train.precision is one of the keys a resume may change).
TEST(Bf16, Fp32CheckpointResumesInBf16) {
  if (!cpu_has_bf16()) GTEST_SKIP() << "this CPU has no native bf16";
  std::ostringstream log;
  auto cfg = load_run_config_text("", "test", test::tiny_run_overrides("bf16r", {"train.steps=6"}));
  auto o = opts("resume32");
  o.stop_after = 3;
  train_model(cfg, o, log);
  auto o2 = o;
  o2.stop_after = 0;
  o2.resume = (fs::path(o.out_dir) / "checkpoints").string();
  o2.resume_overrides = {"train.precision=\"bf16\""};
  std::ostringstream log2;
  auto s = train_model(cfg, o2, log2);
  EXPECT_EQ(s.step, 6);
  EXPECT_NE(log2.str().find("precision: bf16"), std::string::npos) << log2.str();
}

}  // namespace
}  // namespace moeforge
