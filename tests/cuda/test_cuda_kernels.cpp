// The CUDA kernels (kernels/cuda) against plain CPU loops. Skipped when no CUDA device is present (CI,
// the CPU build machine). No LibTorch: raw device buffers, as the kernels take them.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/cpu/gather_rows.h"
#include "kernels/cpu/scatter_add_gated.h"
#include "kernels/cpu/swiglu.h"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/routing.h"

namespace {

bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, sizeof(T) * v.size()), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

std::vector<float> to_host(const float* p, size_t n) {
  std::vector<float> v(n);
  EXPECT_EQ(cudaMemcpy(v.data(), p, sizeof(float) * n, cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

// float32 on both sides; __expf and atomic-add order differ from the CPU loop by a few ulp of O(1) values.
constexpr float kTol = 1e-5f;

void expect_near(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  float worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float d = std::fabs(got[i] - want[i]) / (1.0f + std::fabs(want[i]));
    if (d > worst) worst = d, at = i;
  }
  EXPECT_LE(worst, kTol) << "largest difference at " << at << ": " << got[at] << " vs " << want[at];
}

TEST(CudaKernels, MatchCpuLoops) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t T = 37, N = 64, W = 200;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int64_t> token(0, T - 1);
  std::vector<float> x(T * W), a(N * W), b(N * W), gate(N);
  std::vector<int64_t> index(N);
  for (auto& v : x) v = normal(rng);
  for (auto& v : a) v = normal(rng);
  for (auto& v : b) v = normal(rng);
  for (auto& v : gate) v = std::fabs(normal(rng));
  for (auto& v : index) v = token(rng);

  std::vector<float> gathered(N * W), h(N * W), y(T * W, 0.0f);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < W; ++c) {
      gathered[i * W + c] = x[index[i] * W + c];
      const float s = a[i * W + c] / (1.0f + std::exp(-a[i * W + c]));
      h[i * W + c] = gate[i] * s * b[i * W + c];
      y[index[i] * W + c] += gate[i] * gathered[i * W + c];
    }

  float *dx = to_device(x), *da = to_device(a), *db = to_device(b), *dg = to_device(gate);
  int64_t* di = to_device(index);
  float *dgath = to_device(std::vector<float>(N * W)), *dh = to_device(std::vector<float>(N * W)),
        *dy = to_device(std::vector<float>(T * W, 0.0f));
  namespace kc = moeforge::kernels::cuda;
  ASSERT_EQ(kc::gather_rows(dgath, dx, di, N, W, nullptr), 0);
  ASSERT_EQ(kc::swiglu_forward(dh, da, db, dg, N, W, nullptr), 0);
  ASSERT_EQ(kc::scatter_add_gated(dy, dgath, di, dg, N, W, nullptr), 0);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_near(to_host(dgath, N * W), gathered);
  expect_near(to_host(dh, N * W), h);
  expect_near(to_host(dy, T * W), y);
  for (void* p :
       {static_cast<void*>(dx), static_cast<void*>(da), static_cast<void*>(db), static_cast<void*>(dg),
        static_cast<void*>(di), static_cast<void*>(dgath), static_cast<void*>(dh), static_cast<void*>(dy)})
    cudaFree(p);
}

}  // namespace

// ---- The kernels added for the GPU MoE path: bf16 twins, SwiGLU backward, combine, router, sort. ----
// The references are the project's CPU kernels (kernels/cpu, the semantics the CUDA path must match) or
// plain loops where no CPU kernel exists.

namespace {

using cudatest::bf16_round;
using cudatest::DevBuf;
using cudatest::expect_close;
using cudatest::normal_vector;
namespace kc = moeforge::kernels::cuda;
namespace kcpu = moeforge::kernels::cpu;
using kc::bf16;

// float32 kernels against the CPU kernels: __expf (a few ulp, the CPU uses libm/libmvec exp) and FMA
// contraction differ in the last bits of O(1) values.
constexpr float kF32Tol = 1e-5f;
// bf16 outputs: the float32 result rounded once to bf16 (relative error <= 2^-9) on top of the float32
// differences above; 2^-7 leaves a factor 4 (two ulp of bf16). abs_floor 1e-3: values near 0.
constexpr float kBf16Tol = 1.0f / 128;

// |got - want| <= tol * sum_j |term_j| for a reduction per row: the reduction order (block tree vs the
// CPU's sequential SIMD order) moves a float sum by a few ulp of the sum of the magnitudes, not of the
// (possibly cancelled) result.
void expect_reduction_close(const std::vector<float>& got, const std::vector<float>& want,
                            const std::vector<float>& magnitude, float tol, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t r = 0; r < got.size(); ++r)
    EXPECT_LE(std::fabs(got[r] - want[r]), tol * (magnitude[r] + 1e-6f))
        << what << " row " << r << ": " << got[r] << " vs " << want[r];
}

// Sum_j |dh silu(a) b| per row, the scale of d_gate's rounding.
std::vector<float> d_gate_magnitude(const std::vector<float>& dh, const std::vector<float>& a,
                                    const std::vector<float>& b, int64_t n, int64_t w) {
  std::vector<float> m(n, 0.0f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < w; ++j) {
      const float x = a[r * w + j];
      m[r] += std::fabs(dh[r * w + j] * x / (1.0f + std::exp(-x)) * b[r * w + j]);
    }
  return m;
}

// Widths: 203 takes the scalar path (rows not 16-byte multiples), 256 the vector path.
class SwigluBackward : public ::testing::TestWithParam<int64_t> {};

TEST_P(SwigluBackward, Float32MatchesCpuKernel) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 45, w = GetParam();
  std::mt19937 rng(7);
  auto dh = normal_vector(n * w, rng), a = normal_vector(n * w, rng, 3.0f), b = normal_vector(n * w, rng);
  auto gate = normal_vector(n, rng);
  a[0] = -100.0f, a[1] = 100.0f;  // saturated sigmoid: no inf or NaN
  std::vector<float> da(n * w), db(n * w), dg(n);
  kcpu::swiglu_backward(da.data(), db.data(), dg.data(), dh.data(), a.data(), b.data(), gate.data(), n, w);

  DevBuf<float> d_dh(dh), d_a(a), d_b(b), d_gate(gate), d_da(n * w), d_db(n * w), d_dg(n);
  EXPECT_OK(kc::swiglu_backward(d_da.get(), d_db.get(), d_dg.get(), d_dh.get(), d_a.get(), d_b.get(),
                                d_gate.get(), n, w, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close(d_da.download(), da, kF32Tol, 1.0f, "da");
  expect_close(d_db.download(), db, kF32Tol, 1.0f, "db");
  expect_reduction_close(d_dg.download(), dg, d_gate_magnitude(dh, a, b, n, w), kF32Tol, "d_gate");

  // In place (da aliases dh), no gate, no d_gate: as the fused backward calls it.
  std::vector<float> da1(n * w), db1(n * w);
  kcpu::swiglu_backward(da1.data(), db1.data(), nullptr, dh.data(), a.data(), b.data(), nullptr, n, w);
  EXPECT_OK(kc::swiglu_backward(d_dh.get(), d_db.get(), nullptr, d_dh.get(), d_a.get(), d_b.get(), nullptr, n,
                                w, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close(d_dh.download(), da1, kF32Tol, 1.0f, "da in place");
  expect_close(d_db.download(), db1, kF32Tol, 1.0f, "db without gate");
}

TEST_P(SwigluBackward, Bf16MatchesFloat32CpuKernel) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 45, w = GetParam();
  std::mt19937 rng(8);
  // The CPU reference sees the bf16-rounded inputs, so only the outputs' rounding differs.
  auto dh = bf16_round(normal_vector(n * w, rng)), a = bf16_round(normal_vector(n * w, rng, 3.0f)),
       b = bf16_round(normal_vector(n * w, rng));
  auto gate = normal_vector(n, rng);
  std::vector<float> da(n * w), db(n * w), dg(n);
  kcpu::swiglu_backward(da.data(), db.data(), dg.data(), dh.data(), a.data(), b.data(), gate.data(), n, w);

  DevBuf<bf16> d_dh(cudatest::to_bf16(dh)), d_a(cudatest::to_bf16(a)), d_b(cudatest::to_bf16(b)), d_da(n * w),
      d_db(n * w);
  DevBuf<float> d_gate(gate), d_dg(n);
  EXPECT_OK(kc::swiglu_backward(d_da.get(), d_db.get(), d_dg.get(), d_dh.get(), d_a.get(), d_b.get(),
                                d_gate.get(), n, w, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close(cudatest::to_float(d_da.download()), da, kBf16Tol, 1e-3f, "da bf16");
  expect_close(cudatest::to_float(d_db.download()), db, kBf16Tol, 1e-3f, "db bf16");
  // d_gate stays float32: reduction-order differences only.
  expect_reduction_close(d_dg.download(), dg, d_gate_magnitude(dh, a, b, n, w), kF32Tol, "d_gate bf16");
}

INSTANTIATE_TEST_SUITE_P(Widths, SwigluBackward, ::testing::Values<int64_t>(203, 256));

class Bf16RowKernels : public ::testing::TestWithParam<int64_t> {};

TEST_P(Bf16RowKernels, MatchFloat32CpuKernels) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t T = 37, N = 64, W = GetParam();
  std::mt19937 rng(3);
  auto x = bf16_round(normal_vector(T * W, rng)), a = bf16_round(normal_vector(N * W, rng, 2.0f)),
       b = bf16_round(normal_vector(N * W, rng));
  auto gate = normal_vector(N, rng);
  std::uniform_int_distribution<int64_t> token(0, T - 1);
  std::vector<int64_t> index(N);
  for (auto& v : index) v = token(rng);

  std::vector<float> gathered(N * W), h(N * W), y(T * W, 0.0f);
  kcpu::gather_rows(gathered.data(), x.data(), index.data(), N, W);
  kcpu::swiglu_forward(h.data(), a.data(), b.data(), gate.data(), N, W);
  kcpu::scatter_add_gated(y.data(), gathered.data(), index.data(), gate.data(), N, W, 0, W);

  DevBuf<bf16> dx(cudatest::to_bf16(x)), da(cudatest::to_bf16(a)), db(cudatest::to_bf16(b)), dgath(N * W),
      dh(N * W);
  DevBuf<float> dgate(gate), dy(std::vector<float>(T * W, 0.0f));
  DevBuf<int64_t> di(index);
  EXPECT_OK(kc::gather_rows(dgath.get(), dx.get(), di.get(), N, W, nullptr));
  EXPECT_OK(kc::swiglu_forward(dh.get(), da.get(), db.get(), dgate.get(), N, W, nullptr));
  EXPECT_OK(kc::scatter_add_gated(dy.get(), dgath.get(), di.get(), dgate.get(), N, W, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // A gather is a copy: exact.
  EXPECT_EQ(cudatest::to_float(dgath.download()), gathered);
  expect_close(cudatest::to_float(dh.download()), h, kBf16Tol, 1e-3f, "swiglu bf16");
  // bf16 rows, float32 products and sums: as the float32 CPU kernel up to the atomics' order.
  expect_close(dy.download(), y, kF32Tol, 1.0f, "scatter bf16 -> float32");

  // h in place over a (h may alias a).
  EXPECT_OK(kc::swiglu_forward(da.get(), da.get(), db.get(), dgate.get(), N, W, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close(cudatest::to_float(da.download()), h, kBf16Tol, 1e-3f, "swiglu bf16 in place");
}

INSTANTIATE_TEST_SUITE_P(Widths, Bf16RowKernels, ::testing::Values<int64_t>(203, 256));

TEST(CudaKernels, CombineRowsMatchesLoop) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  for (const int64_t W : {203, 256}) {
    const int64_t T = 29, K = 3, N = T * K;
    std::mt19937 rng(11);
    auto in = bf16_round(normal_vector(N * W, rng));
    auto gate = normal_vector(N, rng);
    std::vector<int64_t> row_of(N);
    std::iota(row_of.begin(), row_of.end(), 0);
    std::shuffle(row_of.begin(), row_of.end(), rng);
    row_of[4] = -1;  // a dropped choice
    std::vector<float> want(T * W, 0.0f), want_ungated(T * W, 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_of[t * K + k];
        if (r < 0) continue;
        for (int64_t c = 0; c < W; ++c) {
          want[t * W + c] += gate[r] * in[r * W + c];
          want_ungated[t * W + c] += in[r * W + c];
        }
      }
    DevBuf<float> din(in), dgate(gate), dout(T * W);
    DevBuf<bf16> din16(cudatest::to_bf16(in)), dout16(T * W);
    DevBuf<int64_t> drow(row_of);
    EXPECT_OK(kc::combine_rows(dout.get(), din.get(), drow.get(), dgate.get(), T, K, W, nullptr));
    EXPECT_OK(kc::combine_rows(dout16.get(), din16.get(), drow.get(), nullptr, T, K, W, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    // Same order of k as the loop; only FMA contraction may differ.
    expect_close(dout.download(), want, 1e-6f, 1.0f, "combine float32");
    expect_close(cudatest::to_float(dout16.download()), want_ungated, kBf16Tol, 1e-3f, "combine bf16");
  }
}

TEST(CudaKernels, ConvertRoundsToNearestEven) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(5);
  auto v = normal_vector(1000, rng, 100.0f);
  // Exact ties between two bf16 values (round to even either way), and specials.
  const float ties[] = {1.0f + 1.0f / 256,
                        1.0f + 3.0f / 256,
                        -2.0f - 2.0f / 256,
                        0.0f,
                        -0.0f,
                        std::numeric_limits<float>::infinity(),
                        3.0e38f};
  v.insert(v.end(), std::begin(ties), std::end(ties));
  const int64_t n = static_cast<int64_t>(v.size());
  DevBuf<float> din(v), dback(n);
  DevBuf<bf16> dout(n);
  EXPECT_OK(kc::convert(dout.get(), din.get(), n, nullptr));
  EXPECT_OK(kc::convert(dback.get(), dout.get(), n, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = dout.download();
  const auto back = dback.download();
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(got[i].bits, cudatest::to_bf16(v[i]).bits) << "value " << v[i];
    EXPECT_EQ(back[i], cudatest::to_float(got[i]));
  }
}

// ---- Router ----

struct TopKCase {
  int64_t E, K;
  bool renormalize;
};

void PrintTo(const TopKCase& c, std::ostream* os) {
  *os << "E " << c.E << " K " << c.K << (c.renormalize ? " renormalised" : "");
}

class TopKSoftmax : public ::testing::TestWithParam<TopKCase> {};

// Softmax in double; the selection rule of routing.h (descending, ties to the lower id).
void cpu_topk(const std::vector<float>& logits, int64_t T, int64_t E, int64_t K, bool renorm,
              std::vector<double>& probs, std::vector<int32_t>& ids, std::vector<double>& gates) {
  probs.assign(T * E, 0.0);
  ids.assign(T * K, 0);
  gates.assign(T * K, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const float* z = logits.data() + t * E;
    const double mx = *std::max_element(z, z + E);
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += std::exp(double(z[e]) - mx);
    for (int64_t e = 0; e < E; ++e) probs[t * E + e] = std::exp(double(z[e]) - mx) / s;
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t x, int32_t y) { return probs[t * E + x] > probs[t * E + y]; });
    double sel = 0;
    for (int64_t k = 0; k < K; ++k) sel += probs[t * E + order[k]];
    for (int64_t k = 0; k < K; ++k) {
      ids[t * K + k] = order[k];
      gates[t * K + k] = probs[t * E + order[k]] / (renorm ? sel : 1.0);
    }
  }
}

template <typename In>
void check_topk(const TopKCase& c, bool bf16_logits) {
  const int64_t T = 301, E = c.E, K = c.K;
  std::mt19937 rng(static_cast<unsigned>(E * 100 + K));
  auto logits = normal_vector(T * E, rng, 2.0f);
  // Exact ties: token 0 all equal (ids must be 0 .. K-1), token 1 a three-way tie for the top.
  std::fill(logits.begin(), logits.begin() + E, 0.5f);
  if (E >= 10) {
    for (int64_t e = 0; e < E; ++e) logits[E + e] = -1.0f;
    logits[E + 9] = logits[E + 5] = logits[E + 3] = 2.0f;
  }
  if (bf16_logits) logits = bf16_round(logits);
  std::vector<double> probs, gates;
  std::vector<int32_t> ids;
  cpu_topk(logits, T, E, K, c.renormalize, probs, ids, gates);

  DevBuf<In> dlogits(T * E);
  if constexpr (std::is_same_v<In, bf16>)
    dlogits.upload(cudatest::to_bf16(logits));
  else
    dlogits.upload(logits);
  DevBuf<float> dprobs(T * E), dgates(T * K);
  DevBuf<int32_t> dids(T * K);
  EXPECT_OK(kc::topk_softmax(dprobs.get(), dgates.get(), dids.get(), dlogits.get(), T, E, K, c.renormalize,
                             nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto gp = dprobs.download(), gg = dgates.download();
  const auto gi = dids.download();

  // float32 softmax (expf, a float sum of E terms) against double: a few ulp of values <= 1.
  constexpr double kProbTol = 2e-6;
  for (int64_t i = 0; i < T * E; ++i) ASSERT_NEAR(gp[i], probs[i], kProbTol) << "prob " << i;
  for (int64_t t = 0; t < T; ++t) {
    // The ids are a top-K of the probabilities: distinct, descending, nothing left out is larger (up to
    // the float rounding that may swap near-ties).
    std::vector<bool> chosen(E, false);
    for (int64_t k = 0; k < K; ++k) {
      const int32_t id = gi[t * K + k];
      ASSERT_TRUE(id >= 0 && id < E) << "token " << t;
      ASSERT_FALSE(chosen[id]) << "token " << t << " chose " << id << " twice";
      chosen[id] = true;
      if (k > 0) {
        EXPECT_LE(probs[t * E + id], probs[t * E + gi[t * K + k - 1]] + kProbTol) << "not descending";
      }
    }
    const double kth = probs[t * E + gi[t * K + K - 1]];
    for (int64_t e = 0; e < E; ++e)
      if (!chosen[e]) {
        EXPECT_LE(probs[t * E + e], kth + kProbTol) << "token " << t << " left out " << e;
      }
    // Where the CPU's ranking has clear margins, the ids are exactly the CPU's.
    bool clear = true;
    std::vector<double> sorted(probs.begin() + t * E, probs.begin() + (t + 1) * E);
    std::sort(sorted.rbegin(), sorted.rend());
    for (int64_t k = 0; k < std::min(K, E - 1); ++k)
      if (sorted[k] - sorted[k + 1] < 1e-5) clear = false;
    for (int64_t k = 0; clear && k < K; ++k) {
      EXPECT_EQ(gi[t * K + k], ids[t * K + k]) << "token " << t << " k " << k;
    }
    // Gates are the chosen probabilities (renormalised), whatever the choice.
    double sel = 0;
    for (int64_t k = 0; k < K; ++k) sel += probs[t * E + gi[t * K + k]];
    for (int64_t k = 0; k < K; ++k)
      EXPECT_NEAR(gg[t * K + k], probs[t * E + gi[t * K + k]] / (c.renormalize ? sel : 1.0), 4e-6);
  }
  // Exact ties go to the lower ids, in ascending order.
  for (int64_t k = 0; k < K; ++k) EXPECT_EQ(gi[k], k) << "all-equal token";
  if (E >= 10) {
    const int32_t want[] = {3, 5, 9};
    for (int64_t k = 0; k < std::min<int64_t>(K, 3); ++k) EXPECT_EQ(gi[K + k], want[k]) << "three-way tie";
  }
}

TEST_P(TopKSoftmax, Float32Logits) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  check_topk<float>(GetParam(), false);
}

TEST_P(TopKSoftmax, Bf16Logits) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  check_topk<bf16>(GetParam(), true);
}

INSTANTIATE_TEST_SUITE_P(Shapes, TopKSoftmax,
                         ::testing::Values(TopKCase{16, 2, true}, TopKCase{16, 2, false},
                                           TopKCase{64, 8, true}, TopKCase{8, 1, false},
                                           TopKCase{160, 4, true}, TopKCase{256, 8, false},
                                           TopKCase{256, 32, true}, TopKCase{5, 5, true}),
                         [](const ::testing::TestParamInfo<TopKCase>& i) {
                           return "E" + std::to_string(i.param.E) + "_K" + std::to_string(i.param.K) +
                                  (i.param.renormalize ? "_renorm" : "_raw");
                         });

TEST(CudaKernels, TopKSoftmaxRejectsBadShapesAndSurvivesNaN) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  DevBuf<float> logits(4 * 300), probs(4 * 300), gates(4 * 8);
  DevBuf<int32_t> ids(4 * 8);
  const int bad = static_cast<int>(cudaErrorInvalidValue);
  EXPECT_EQ(kc::topk_softmax(probs.get(), gates.get(), ids.get(), logits.get(), 4, 300, 2, true, nullptr),
            bad);
  EXPECT_EQ(kc::topk_softmax(probs.get(), gates.get(), ids.get(), logits.get(), 4, 16, 0, true, nullptr),
            bad);
  EXPECT_EQ(kc::topk_softmax(probs.get(), gates.get(), ids.get(), logits.get(), 4, 4, 5, true, nullptr), bad);
  // A NaN logit makes the token's probabilities NaN; the ids must still be K distinct experts.
  std::vector<float> z(4 * 16, 0.0f);
  z[3] = std::numeric_limits<float>::quiet_NaN();
  DevBuf<float> dz(z);
  EXPECT_OK(kc::topk_softmax(nullptr, gates.get(), ids.get(), dz.get(), 4, 16, 8, true, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto gi = ids.download();
  std::vector<int32_t> first(gi.begin(), gi.begin() + 8);
  std::sort(first.begin(), first.end());
  EXPECT_TRUE(std::adjacent_find(first.begin(), first.end()) == first.end());
  for (int32_t id : first) EXPECT_TRUE(id >= 0 && id < 16);
}

// The router backward against the explicit Jacobian of gates (and probabilities) wrt the logits, in double.
TEST(CudaKernels, TopKSoftmaxBackwardMatchesJacobian) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  for (const bool renorm : {true, false}) {
    for (const int64_t E : {16, 100}) {
      const int64_t T = 53, K = 4;
      std::mt19937 rng(static_cast<unsigned>(E + renorm));
      auto logits = normal_vector(T * E, rng, 1.5f);
      auto d_gates = normal_vector(T * K, rng), d_probs = normal_vector(T * E, rng);
      DevBuf<float> dz(logits), dp(T * E), dg(T * K), ddg(d_gates), ddp(d_probs), dlog(T * E);
      DevBuf<int32_t> di(T * K);
      EXPECT_OK(kc::topk_softmax(dp.get(), dg.get(), di.get(), dz.get(), T, E, K, renorm, nullptr));
      EXPECT_OK(kc::topk_softmax_backward(dlog.get(), ddg.get(), ddp.get(), dp.get(), dg.get(), di.get(), T,
                                          E, K, renorm, nullptr));
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto ids = di.download();
      const auto got = dlog.download();
      std::vector<float> want(T * E);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> p(E);
        double mx = -1e300, s = 0;
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, double(logits[t * E + e]));
        for (int64_t e = 0; e < E; ++e) s += p[e] = std::exp(double(logits[t * E + e]) - mx);
        for (auto& v : p) v /= s;
        auto dp_dz = [&](int64_t i, int64_t e) { return p[i] * ((i == e ? 1.0 : 0.0) - p[e]); };
        double S = 0;
        for (int64_t k = 0; k < K; ++k) S += p[ids[t * K + k]];
        for (int64_t e = 0; e < E; ++e) {
          double g = 0;
          for (int64_t i = 0; i < E; ++i) g += d_probs[t * E + i] * dp_dz(i, e);
          double dS = 0;
          for (int64_t k = 0; k < K; ++k) dS += dp_dz(ids[t * K + k], e);
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = ids[t * K + k];
            const double dgk = renorm ? (dp_dz(i, e) * S - p[i] * dS) / (S * S) : dp_dz(i, e);
            g += d_gates[t * K + k] * dgk;
          }
          want[t * E + e] = static_cast<float>(g);
        }
      }
      // float32 against double for O(1) gradients built from a few sums of E terms.
      expect_close(got, want, 1e-5f, 1.0f, renorm ? "renormalised" : "raw gates");
    }
  }
}

// ---- Counting sort ----

// The stable counting sort of src/routing/plan.cpp (dropless): ascending flat position inside an expert.
struct CpuSort {
  std::vector<int64_t> offsets, token_index, row_of;
  std::vector<float> gate_rows;
};
CpuSort cpu_sort(const std::vector<int32_t>& choices, const std::vector<float>& gates, int64_t K, int64_t E) {
  const int64_t n = static_cast<int64_t>(choices.size());
  CpuSort s;
  s.offsets.assign(E + 1, 0);
  for (int32_t e : choices)
    if (e >= 0 && e < E) ++s.offsets[e + 1];
  for (int64_t e = 0; e < E; ++e) s.offsets[e + 1] += s.offsets[e];
  const int64_t valid = s.offsets[E];
  s.token_index.assign(valid, -7);
  s.gate_rows.assign(valid, -7.0f);
  s.row_of.assign(n, -1);
  std::vector<int64_t> cursor(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t p = 0; p < n; ++p) {
    const int32_t e = choices[p];
    if (e < 0 || e >= E) continue;
    const int64_t slot = cursor[e]++;
    s.token_index[slot] = p / K;
    s.gate_rows[slot] = gates[p];
    s.row_of[p] = slot;
  }
  return s;
}

struct SortCase {
  int64_t T, K, E;
  bool skewed;
};

void PrintTo(const SortCase& c, std::ostream* os) {
  *os << "T " << c.T << " K " << c.K << " E " << c.E << (c.skewed ? " skewed" : " uniform");
}

class CountingSort : public ::testing::TestWithParam<SortCase> {};

TEST_P(CountingSort, MatchesCpuStableSortExactly) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const auto c = GetParam();
  const int64_t n = c.T * c.K;
  std::mt19937 rng(static_cast<unsigned>(c.T + c.K * 7 + c.E * 13));
  std::vector<int32_t> choices(n);
  // Skewed: half the assignments on expert 0 (whole warps of equal ids), the rest on few experts, so many
  // experts stay empty; uniform: every expert.
  std::uniform_int_distribution<int32_t> any(0, static_cast<int32_t>(c.E - 1));
  std::uniform_int_distribution<int32_t> few(0, static_cast<int32_t>(std::min<int64_t>(c.E, 3) - 1));
  std::bernoulli_distribution half(0.5);
  for (auto& e : choices)
    e = c.skewed ? (half(rng) ? 0 : few(rng) * static_cast<int32_t>(c.E > 3 ? c.E / 3 : 1)) : any(rng);
  std::vector<float> gates(n);
  for (int64_t p = 0; p < n; ++p) gates[p] = static_cast<float>(p) + 0.25f;  // identifies the assignment
  const CpuSort want = cpu_sort(choices, gates, c.K, c.E);

  DevBuf<int32_t> dch(choices);
  DevBuf<float> dgates(gates), dgrows(n);
  DevBuf<int64_t> doff(c.E + 1), dtok(n), drow(n);
  DevBuf<char> scratch(kc::expert_sort_scratch_bytes(n, c.E));
  dtok.fill_bytes(0xff);
  EXPECT_OK(kc::expert_counting_sort(doff.get(), dtok.get(), drow.get(), dgrows.get(), dch.get(),
                                     dgates.get(), c.T, c.K, c.E, scratch.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(doff.download(), want.offsets);
  EXPECT_EQ(drow.download(), want.row_of);
  auto tok = dtok.download();
  auto grows = dgrows.download();
  tok.resize(want.token_index.size());
  grows.resize(want.gate_rows.size());
  EXPECT_EQ(tok, want.token_index);
  EXPECT_EQ(grows, want.gate_rows);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CountingSort,
                         ::testing::Values(SortCase{1, 1, 1, false}, SortCase{1, 8, 64, false},
                                           SortCase{1000, 2, 16, false}, SortCase{1000, 2, 16, true},
                                           SortCase{4096, 8, 64, false}, SortCase{4096, 8, 64, true},
                                           SortCase{777, 3, 1024, false}, SortCase{5000, 2, 7, true},
                                           SortCase{300, 1, 1000, true}),
                         [](const ::testing::TestParamInfo<SortCase>& i) {
                           return "T" + std::to_string(i.param.T) + "_K" + std::to_string(i.param.K) + "_E" +
                                  std::to_string(i.param.E) + (i.param.skewed ? "_skewed" : "_uniform");
                         });

TEST(CudaKernels, CountingSortLeavesOutBadIdsAndHandlesNoTokens) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t T = 700, K = 2, E = 5, n = T * K;
  std::vector<int32_t> choices(n);
  for (int64_t p = 0; p < n; ++p) choices[p] = static_cast<int32_t>((p * 7) % E);
  choices[3] = -1;
  choices[600] = static_cast<int32_t>(E);
  const CpuSort want = cpu_sort(choices, std::vector<float>(n, 1.0f), K, E);
  ASSERT_EQ(want.offsets[E], n - 2);
  DevBuf<int32_t> dch(choices);
  DevBuf<int64_t> doff(E + 1), dtok(n), drow(n);
  DevBuf<char> scratch(kc::expert_sort_scratch_bytes(n, E));
  EXPECT_OK(kc::expert_counting_sort(doff.get(), dtok.get(), drow.get(), nullptr, dch.get(), nullptr, T, K, E,
                                     scratch.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(doff.download(), want.offsets);
  EXPECT_EQ(drow.download(), want.row_of);
  auto tok = dtok.download();
  tok.resize(n - 2);
  EXPECT_EQ(tok, want.token_index);

  // No tokens: all offsets 0.
  doff.fill_bytes(0x7f);
  EXPECT_OK(kc::expert_counting_sort(doff.get(), dtok.get(), drow.get(), nullptr, dch.get(), nullptr, 0, K, E,
                                     scratch.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(doff.download(), std::vector<int64_t>(E + 1, 0));
  EXPECT_EQ(kc::expert_counting_sort(doff.get(), dtok.get(), drow.get(), nullptr, dch.get(), nullptr, T, K,
                                     1025, scratch.get(), nullptr),
            static_cast<int>(cudaErrorInvalidValue));
}

}  // namespace
