// The fused CPU ops of the model against their plain twins: causal attention (src/model/attention_core.cpp,
// kernels/cpu/attention.cpp) and RMSNorm (src/model/norm.cpp, kernels/cpu/rmsnorm.cpp): the same function and
// the same gradients, the twins against their definitions in double precision, and finite differences
// (docs/performance.md, "Fused attention", "Fused RMSNorm").
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moeforge/model/attention_core.h"
#include "moeforge/model/norm.h"

namespace moeforge {
namespace {

struct Grads {
  torch::Tensor y, dq, dk, dv;
};

template <typename Fn>
Grads run(Fn fn, const torch::Tensor& q0, const torch::Tensor& k0, const torch::Tensor& v0,
          const torch::Tensor& gy, torch::ScalarType dt) {
  // Fresh leaves (copy = true), keeping q0's strides.
  auto q = q0.to(dt, false, true).requires_grad_(), k = k0.to(dt, false, true).requires_grad_();
  auto v = v0.to(dt, false, true).requires_grad_();
  auto y = fn(q, k, v);
  y.backward(gy.to(dt));
  return {y.detach().to(torch::kDouble), q.grad().to(torch::kDouble), k.grad().to(torch::kDouble),
          v.grad().to(torch::kDouble)};
}

double maxdiff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

TEST(FusedAttention, MatchesThePlainTwinInDoubleForwardAndBackward) {
  torch::manual_seed(4);
  for (auto [B, H, S, D] : {std::array<int64_t, 4>{2, 3, 17, 8}, {1, 2, 1, 4}, {2, 4, 64, 32}}) {
    auto q = torch::randn({B, S, H, D}).transpose(1, 2);  // strided, as the model's views are
    auto k = torch::randn({B, H, S, D}), v = torch::randn({B, H, S, D}), gy = torch::randn({B, H, S, D});
    auto fused =
        run([](auto& a, auto& b, auto& c) { return causal_attention(a, b, c); }, q, k, v, gy, torch::kFloat);
    auto gold = run([](auto& a, auto& b, auto& c) { return causal_attention_reference(a, b, c); }, q, k, v,
                    gy, torch::kDouble);
    // float32 against float64 over sums of at most S = 64 terms of O(1) values: ~1e-6; 2e-5 still fails a
    // missing mask, scale or softmax term (O(0.1)).
    EXPECT_LT(maxdiff(fused.y, gold.y), 2e-5) << S;
    EXPECT_LT(maxdiff(fused.dq, gold.dq), 2e-5) << S;
    EXPECT_LT(maxdiff(fused.dk, gold.dk), 2e-5) << S;
    EXPECT_LT(maxdiff(fused.dv, gold.dv), 2e-5) << S;
  }
}

TEST(FusedAttention, ReferenceIsTheDefinition) {
  torch::manual_seed(5);
  const int64_t S = 5, D = 4;
  auto q = torch::randn({1, 1, S, D}, torch::kDouble), k = torch::randn({1, 1, S, D}, torch::kDouble);
  auto v = torch::randn({1, 1, S, D}, torch::kDouble);
  auto y = causal_attention_reference(q, k, v);
  for (int64_t i = 0; i < S; ++i) {
    auto s = (k[0][0].narrow(0, 0, i + 1).matmul(q[0][0][i])) / std::sqrt(double(D));  // [i + 1]
    auto p = torch::softmax(s, 0);
    auto want = p.matmul(v[0][0].narrow(0, 0, i + 1));
    EXPECT_LT(maxdiff(y[0][0][i], want), 1e-12) << i;
  }
}

TEST(FusedAttention, FiniteDifferencesOfTheFusedBackward) {
  torch::manual_seed(6);
  auto q = torch::randn({1, 2, 6, 4}), k = torch::randn({1, 2, 6, 4}), v = torch::randn({1, 2, 6, 4});
  auto gy = torch::randn({1, 2, 6, 4});
  auto g =
      run([](auto& a, auto& b, auto& c) { return causal_attention(a, b, c); }, q, k, v, gy, torch::kFloat);
  // Central differences of <gy, y(q)> in float32 with step 1e-2: truncation ~1e-4, rounding ~1e-5.
  const double h = 1e-2;
  for (int64_t idx : {0, 7, 20, 45}) {
    auto qp = q.clone(), qm = q.clone();
    qp.view(-1)[idx] += h;
    qm.view(-1)[idx] -= h;
    const double fd = ((causal_attention(qp, k, v) * gy).sum().item<double>() -
                       (causal_attention(qm, k, v) * gy).sum().item<double>()) /
                      (2 * h);
    EXPECT_NEAR(fd, g.dq.view(-1)[idx].item<double>(), 2e-3) << idx;
  }
}

TEST(FusedRMSNorm, MatchesThePlainTwinInDoubleForwardAndBackward) {
  torch::manual_seed(7);
  for (auto [n, C] : {std::array<int64_t, 2>{1, 5}, {37, 128}, {300, 48}}) {
    auto x = (torch::randn({n, C}) * 3).requires_grad_();
    auto w = (1 + 0.3 * torch::randn({C})).requires_grad_();
    auto gy = torch::randn({n, C});
    auto y = rms_norm(x, w, 1e-5);
    y.backward(gy);
    auto xd = x.detach().to(torch::kDouble).requires_grad_(),
         wd = w.detach().to(torch::kDouble).requires_grad_();
    auto yd = rms_norm_reference(xd, wd, 1e-5);
    yd.backward(gy.to(torch::kDouble));
    // float32 against float64: rows of up to 128 terms, values O(1): ~1e-6. The weight gradient sums n = 300
    // rows of O(1) terms: ~1e-5 relative rounding; bounds 1e-5 / 1e-4 still fail any wrong term (O(0.1)).
    EXPECT_LT(maxdiff(y.detach().to(torch::kDouble), yd.detach()), 1e-5) << n;
    EXPECT_LT(maxdiff(x.grad().to(torch::kDouble), xd.grad()), 1e-5) << n;
    EXPECT_LT(maxdiff(w.grad().to(torch::kDouble), wd.grad()), 1e-4) << n;
  }
}

TEST(FusedRMSNorm, ThreeDimensionalInputAndTheDefinition) {
  torch::manual_seed(8);
  auto x = torch::randn({2, 3, 8}, torch::kDouble), w = torch::randn({8}, torch::kDouble);
  auto y = rms_norm_reference(x, w, 1e-6);
  const double rms = std::sqrt(x[1][2].pow(2).mean().item<double>() + 1e-6);
  EXPECT_LT(maxdiff(y[1][2], x[1][2] / rms * w), 1e-12);
  auto yf = rms_norm(x.to(torch::kFloat), w.to(torch::kFloat), 1e-6);
  EXPECT_EQ(yf.sizes(), x.sizes());
  EXPECT_LT(maxdiff(yf.to(torch::kDouble), y), 1e-5);  // float32 rounding of O(1) values
}

}  // namespace
}  // namespace moeforge

#include "moeforge/train/adamw_update.h"
#include "moeforge/train/optim.h"

namespace moeforge {
namespace {

TEST(FusedAdamW, MatchesThePlainTwinOverSteps) {
  torch::manual_seed(9);
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{300, 70}, {129}}) {
    auto p_f = torch::randn(shape), p_r = p_f.clone();
    auto m_f = torch::zeros(shape), v_f = torch::zeros(shape), m_r = m_f.clone(), v_r = v_f.clone();
    for (int t = 1; t <= 5; ++t) {
      auto g = torch::randn(shape) * (t % 2 ? 1.0 : 1e-3);  // large and tiny gradients
      p_f.mutable_grad() = g;
      p_r.mutable_grad() = g.clone();
      const AdamWScalars s{3e-3, 0.9, 0.95, 1e-8, 0.1, 1 - std::pow(0.9, t), 1 - std::pow(0.95, t)};
      adamw_update(p_f, m_f, v_f, s, /*fused=*/true);
      adamw_update(p_r, m_r, v_r, s, /*fused=*/false);
    }
    // Float rounding only (a fused multiply-add or another product order in LibTorch's kernels): relative
    // differences of a few 1e-7 after 5 steps; an update term missing or wrong moves p by ~1e-3.
    EXPECT_LT(maxdiff(p_f, p_r), 1e-5);
    EXPECT_LT((m_f - m_r).abs().max().item<double>(), 1e-6);
    EXPECT_LT(((v_f - v_r).abs() / (v_r.abs() + 1e-12)).max().item<double>(), 1e-5);
    // Decoupled decay only on matrices: a vector without gradient signal keeps its value.
  }
  auto w = torch::ones({4}), m = torch::zeros({4}), v = torch::zeros({4});
  w.mutable_grad() = torch::zeros({4});
  adamw_update(w, m, v, {1.0, 0.9, 0.95, 1e-8, 0.5, 0.1, 0.05}, true);
  EXPECT_TRUE(torch::equal(w, torch::ones({4})));  // g = 0 and no decay on a vector: unchanged
}

// The clip's norm summed in float64 in chunks (src/train/optim.cpp) against float64 of the whole gradient:
// equal to float64 rounding (~1e-16 relative; 1e-12 leaves room for the order of ~1e6 additions), over a
// gradient of several chunks and a length no multiple of the kernel's 8 lanes, a float64 gradient (the plain
// path) and a parameter without gradient; and the scaling applied when the norm is over the limit.
TEST(ClipGradNorm, FusedSumEqualsTheFloat64Norm) {
  torch::manual_seed(4);
  auto a = torch::randn({200003}), b = torch::randn({3, 7}, torch::kDouble), c = torch::randn({5});
  a.mutable_grad() = torch::randn({200003}) * 3.0;
  b.mutable_grad() = torch::randn({3, 7}, torch::kDouble);
  const double want = std::sqrt(a.grad().to(torch::kDouble).pow(2).sum().item<double>() +
                                b.grad().pow(2).sum().item<double>());
  const auto ga = a.grad().clone();
  const double got = clip_grad_norm({a, b, c}, 0.0);  // 0: no clipping
  EXPECT_NEAR(got, want, 1e-12 * want);
  EXPECT_TRUE(torch::equal(a.grad(), ga));
  const double norm = clip_grad_norm({a, b, c}, 1.0);
  EXPECT_NEAR(norm, want, 1e-12 * want);
  EXPECT_NEAR(clip_grad_norm({a, b, c}, 0.0), 1.0, 1e-5);  // scaled to the limit (1 / (norm + 1e-6))
}

}  // namespace
}  // namespace moeforge
