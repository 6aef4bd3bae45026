// The cuBLAS GEMMs of the CUDA MoE path (kernels/cuda/grouped_gemm.h) against CPU triple loops, and the
// row-major -> column-major mapping they rely on (kernels/cuda/gemm_layout.h). The GemmLayout tests are
// host-only and run everywhere; every other test skips itself when no CUDA device is present.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/cuda/gemm_layout.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/moe_layer.h"

namespace cudatest_moe {
std::string describe(const moeforge::kernels::cuda::MoeConfig& c);
namespace {

namespace kc = moeforge::kernels::cuda;
using cudatest::DevBuf;
using cudatest::normal_vector;
using kc::bf16;
using kc::DType;

// ---- Host references ----

// Row-major C [M, N] = op(A) op(B) in double; A stored [M, K] ([K, M] when ta), B [K, N] ([N, K] when tb).
// mag[i, j] = sum_l |op(A)[i, l] op(B)[l, j]|, the scale of a float sum's rounding.
void rowmajor_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, const float* B,
                   std::vector<double>& C, std::vector<double>* mag = nullptr) {
  C.assign(M * N, 0.0);
  if (mag) mag->assign(M * N, 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t l = 0; l < K; ++l) {
        const double a = ta ? A[l * M + i] : A[i * K + l];
        const double b = tb ? B[j * K + l] : B[l * N + j];
        C[i * N + j] += a * b;
        if (mag) (*mag)[i * N + j] += std::fabs(a * b);
      }
}

// What cuBLAS computes for a ColMajorGemm (beta = 0), read literally from the column-major definition.
void colmajor_reference(const kc::ColMajorGemm& g, const float* first, const float* second, float* c) {
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t j = 0; j < g.n; ++j) {
      double s = 0;
      for (int64_t l = 0; l < g.k; ++l) {
        const double a = g.trans_first ? first[l + i * g.ld_first] : first[i + l * g.ld_first];
        const double b = g.trans_second ? second[j + l * g.ld_second] : second[l + j * g.ld_second];
        s += a * b;
      }
      c[i + j * g.ldc] = static_cast<float>(s);
    }
}

// ---- GemmLayout: host-only, no device needed ----

TEST(GemmLayout, ColumnMajorCallComputesTheRowMajorProduct) {
  std::mt19937 rng(1);
  const int64_t M = 5, N = 7, K = 3;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) {
      const auto A = normal_vector(M * K, rng), B = normal_vector(K * N, rng);
      std::vector<float> C(M * N, -1.0f);
      const kc::ColMajorGemm g = kc::col_major_gemm(ta, tb, M, N, K, A.data(), B.data(), C.data());
      colmajor_reference(g, static_cast<const float*>(g.first), static_cast<const float*>(g.second),
                         static_cast<float*>(g.c));
      std::vector<double> want;
      rowmajor_gemm(ta, tb, M, N, K, A.data(), B.data(), want);
      for (int64_t i = 0; i < M * N; ++i)
        EXPECT_EQ(C[i], static_cast<float>(want[i])) << "ta " << ta << " tb " << tb << " at " << i;
    }
}

// Offsets with empty experts first, inside and last.
const std::vector<int64_t> kOffsets = {0, 0, 5, 5, 40, 41, 41};

TEST(GemmLayout, GroupedProblemsAreThePerExpertProducts) {
  const int64_t E = static_cast<int64_t>(kOffsets.size()) - 1, N = kOffsets.back(), O = 6, I = 4;
  std::mt19937 rng(2);
  const auto W = normal_vector(E * O * I, rng);
  for (const auto kind : {kc::GroupedKind::kNT, kc::GroupedKind::kNN, kc::GroupedKind::kWeightGrad}) {
    const bool wg = kind == kc::GroupedKind::kWeightGrad;
    const int64_t in_w = kind == kc::GroupedKind::kNT ? I : O;  // columns of the first operand
    const int64_t out_rows = wg ? E * O : N, out_w = wg ? I : (kind == kc::GroupedKind::kNT ? O : I);
    const auto a = normal_vector(N * in_w, rng), x = normal_vector(N * I, rng);
    const float* b = wg ? x.data() : W.data();
    std::vector<float> out(out_rows * out_w, 0.0f);
    const auto problems = kc::grouped_problems(kind, out.data(), a.data(), b, kOffsets.data(), E, O, I, 4, 4);
    ASSERT_EQ(problems.size(), 3u);  // experts 1, 3, 4
    for (const auto& p : problems)
      colmajor_reference(p.gemm, static_cast<const float*>(p.gemm.first),
                         static_cast<const float*>(p.gemm.second), static_cast<float*>(p.gemm.c));
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = kOffsets[e], n = kOffsets[e + 1] - r0;
      if (n == 0) continue;
      std::vector<double> want;
      if (kind == kc::GroupedKind::kNT) {
        rowmajor_gemm(false, true, n, O, I, a.data() + r0 * I, W.data() + e * O * I, want);
        for (int64_t i = 0; i < n * O; ++i) EXPECT_EQ(out[r0 * O + i], float(want[i])) << "NT expert " << e;
      } else if (kind == kc::GroupedKind::kNN) {
        rowmajor_gemm(false, false, n, I, O, a.data() + r0 * O, W.data() + e * O * I, want);
        for (int64_t i = 0; i < n * I; ++i) EXPECT_EQ(out[r0 * I + i], float(want[i])) << "NN expert " << e;
      } else {
        rowmajor_gemm(true, false, O, I, n, a.data() + r0 * O, x.data() + r0 * I, want);
        for (int64_t i = 0; i < O * I; ++i)
          EXPECT_EQ(out[e * O * I + i], float(want[i])) << "dW expert " << e;
      }
    }
  }
}

TEST(GemmLayout, GroupedCallNeedsAlignedOperands) {
  // Fake, never dereferenced device addresses: only their alignment matters.
  void* out = reinterpret_cast<void*>(uintptr_t{1} << 20);
  const void* in = reinterpret_cast<const void*>(uintptr_t{2} << 20);
  const void* w = reinterpret_cast<const void*>(uintptr_t{3} << 20);
  const int64_t E = static_cast<int64_t>(kOffsets.size()) - 1;
  for (const auto kind : {kc::GroupedKind::kNT, kc::GroupedKind::kNN, kc::GroupedKind::kWeightGrad}) {
    // bf16 rows of 64 and 96 elements: 128 and 192 bytes, every row start 16-byte aligned.
    EXPECT_TRUE(kc::grouped_call_fits(
        kc::grouped_problems(kind, out, in, w, kOffsets.data(), E, 64, 96, 2, 2), 2, 2));
    // 37 or 53 columns: rows of odd byte counts.
    EXPECT_FALSE(kc::grouped_call_fits(
        kc::grouped_problems(kind, out, in, w, kOffsets.data(), E, 37, 53, 2, 2), 2, 2));
  }
  // A misaligned base pointer.
  const void* odd = reinterpret_cast<const void*>((uintptr_t{2} << 20) + 2);
  EXPECT_FALSE(kc::grouped_call_fits(
      kc::grouped_problems(kc::GroupedKind::kNT, out, odd, w, kOffsets.data(), E, 64, 96, 2, 2), 2, 2));
}

// ---- cuBLAS on the device ----

class CublasHandle {
 public:
  CublasHandle() { EXPECT_EQ(cublasCreate(&h_), CUBLAS_STATUS_SUCCESS); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  ~CublasHandle() {
    if (h_) cublasDestroy(h_);
  }
  void* get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

// A device buffer of float32 or bf16, filled from and read back as float.
class AnyBuf {
 public:
  AnyBuf(DType t, size_t n) : t_(t), n_(n), bytes_(n * static_cast<size_t>(kc::dtype_size(t))) {}
  AnyBuf(DType t, const std::vector<float>& v) : AnyBuf(t, v.size()) { upload(v); }
  void upload(const std::vector<float>& v) {
    ASSERT_EQ(v.size(), n_);
    if (t_ == DType::kFloat32)
      bytes_.upload(std::vector<char>(reinterpret_cast<const char*>(v.data()),
                                      reinterpret_cast<const char*>(v.data() + v.size())));
    else {
      const auto h = cudatest::to_bf16(v);
      bytes_.upload(std::vector<char>(reinterpret_cast<const char*>(h.data()),
                                      reinterpret_cast<const char*>(h.data() + h.size())));
    }
  }
  std::vector<float> download() const {
    const auto b = bytes_.download();
    std::vector<float> v(n_);
    if (t_ == DType::kFloat32) {
      std::memcpy(v.data(), b.data(), b.size());
    } else {
      std::vector<bf16> h(n_);
      std::memcpy(h.data(), b.data(), b.size());
      v = cudatest::to_float(h);
    }
    return v;
  }
  void* get() const { return bytes_.get(); }

 private:
  DType t_;
  size_t n_;
  DevBuf<char> bytes_;
};

// v as a buffer of type t holds it: rounded through bf16 for bf16.
std::vector<float> as_stored(DType t, const std::vector<float>& v) {
  return t == DType::kFloat32 ? v : cudatest::bf16_round(v);
}

// cuBLAS's float32 result against the double loop: a float sum of products is off by a few ulp of the sum
// of the magnitudes (any order, split-K or not). A bf16 output is rounded once (2^-9 relative, checked at
// 2^-7); with bf16 outputs cuBLAS may also reduce split-K partial sums in bf16 (the reduced-precision
// reduction that CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION turns off), a rounding of the order of
// 2^-9 of the magnitudes, checked at 2^-8. A layout mistake gives errors of the order of the magnitudes.
void expect_gemm_close(const std::vector<float>& got, const std::vector<double>& want,
                       const std::vector<double>& mag, DType out, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol =
        out == DType::kFloat32 ? 1e-5 * (mag[i] + 1e-20) : std::fabs(want[i]) / 128 + mag[i] / 256 + 1e-20;
    if (std::fabs(got[i] - want[i]) > tol) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", want " << want[i] << " (tolerance "
                    << tol << ")";
      return;
    }
  }
}

const char* name(DType t) {
  return t == DType::kFloat32 ? "f32" : "bf16";
}

TEST(CublasGemm, RowMajorProductsInEveryTransposition) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  CublasHandle h;
  const int64_t M = 33, N = 20, K = 17;
  std::mt19937 rng(4);
  for (const DType ab : {DType::kFloat32, DType::kBFloat16})
    for (const DType c : {DType::kFloat32, DType::kBFloat16}) {
      if (ab == DType::kFloat32 && c == DType::kBFloat16) continue;  // not a cuBLAS combination
      for (const bool ta : {false, true})
        for (const bool tb : {false, true})
          for (const bool acc : {false, true}) {
            const auto A = as_stored(ab, normal_vector(M * K, rng)),
                       B = as_stored(ab, normal_vector(K * N, rng));
            const auto C0 = as_stored(c, normal_vector(M * N, rng));
            AnyBuf dA(ab, A), dB(ab, B), dC(c, C0);
            EXPECT_OK(kc::gemm(h.get(), ab, c, ta, tb, M, N, K, dA.get(), dB.get(), dC.get(), acc, nullptr));
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            std::vector<double> want, mag;
            rowmajor_gemm(ta, tb, M, N, K, A.data(), B.data(), want, &mag);
            if (acc)
              for (int64_t i = 0; i < M * N; ++i) want[i] += C0[i], mag[i] += std::fabs(C0[i]);
            expect_gemm_close(dC.download(), want, mag, c,
                              std::string(name(ab)) + "->" + name(c) + " ta " + std::to_string(ta) + " tb " +
                                  std::to_string(tb) + " acc " + std::to_string(acc));
          }
    }
  // K = 0: C = 0 (or unchanged when accumulating).
  AnyBuf dC(DType::kFloat32, std::vector<float>(M * N, 3.0f));
  EXPECT_OK(kc::gemm(h.get(), DType::kFloat32, DType::kFloat32, false, false, M, N, 0, nullptr, nullptr,
                     dC.get(), false, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dC.download(), std::vector<float>(M * N, 0.0f));
}

// (dtype, O, I, pointer scratch given, accumulate). (64, 96) allows the single grouped cuBLAS call,
// (37, 53) forces the per-expert loop; without scratch it is always the loop.
using GroupedParam = std::tuple<DType, std::pair<int64_t, int64_t>, bool, bool>;
class GroupedGemm : public ::testing::TestWithParam<GroupedParam> {};

TEST_P(GroupedGemm, MatchesPerExpertLoops) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const auto [dt, shape, use_scratch, acc] = GetParam();
  const auto [O, I] = shape;
  const int64_t E = static_cast<int64_t>(kOffsets.size()) - 1, N = kOffsets.back();
  CublasHandle h;
  DevBuf<char> scratch(kc::grouped_gemm_scratch_bytes(E));
  void* ps = use_scratch ? scratch.get() : nullptr;
  std::mt19937 rng(static_cast<unsigned>(O + I + use_scratch * 3 + acc * 5));
  const auto W = as_stored(dt, normal_vector(E * O * I, rng));
  AnyBuf dW(dt, W);
  const std::string tag = std::string(name(dt)) + " O " + std::to_string(O) + " I " + std::to_string(I) +
                          (use_scratch ? " scratch" : " loop") + (acc ? " accumulate" : "");

  // Forward (nt): out[rows e] (+)= in[rows e] @ W[e]^T, [N, I] -> [N, O]; data gradient (nn):
  // out[rows e] (+)= in[rows e] @ W[e], [N, O] -> [N, I].
  for (const bool nt : {true, false}) {
    const int64_t in_cols = nt ? I : O, out_cols = nt ? O : I;
    const auto in = as_stored(dt, normal_vector(N * in_cols, rng));
    const auto C0 = as_stored(dt, normal_vector(N * out_cols, rng));
    AnyBuf din(dt, in), dout(dt, C0);
    if (nt)
      EXPECT_OK(kc::grouped_mm_nt(h.get(), dt, dout.get(), din.get(), dW.get(), kOffsets.data(), E, O, I, acc,
                                  ps, nullptr));
    else
      EXPECT_OK(kc::grouped_mm_nn(h.get(), dt, dout.get(), din.get(), dW.get(), kOffsets.data(), E, O, I, acc,
                                  ps, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<double> want(N * out_cols), mag(N * out_cols);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = kOffsets[e], n = kOffsets[e + 1] - r0;
      std::vector<double> w1, m1;
      rowmajor_gemm(false, nt, n, out_cols, in_cols, in.data() + r0 * in_cols, W.data() + e * O * I, w1, &m1);
      for (int64_t i = 0; i < n * out_cols; ++i)
        want[r0 * out_cols + i] = w1[i], mag[r0 * out_cols + i] = m1[i];
    }
    if (acc)
      for (int64_t i = 0; i < N * out_cols; ++i) want[i] += C0[i], mag[i] += std::fabs(C0[i]);
    expect_gemm_close(dout.download(), want, mag, dt, (nt ? "NT " : "NN ") + tag);
  }
  // Weight gradient: dw[e] (+)= d[rows e]^T @ in[rows e], into the activations' type and into float32.
  std::vector<DType> dw_types = {dt};
  if (dt != DType::kFloat32) dw_types.push_back(DType::kFloat32);  // bf16 activations, float32 gradients
  for (const DType dw_dt : dw_types) {
    const auto d = as_stored(dt, normal_vector(N * O, rng)), in = as_stored(dt, normal_vector(N * I, rng));
    const auto C0 = as_stored(dw_dt, normal_vector(E * O * I, rng));  // nonzero: empty experts must be zeroed
    AnyBuf dd(dt, d), din(dt, in), ddw(dw_dt, C0);
    EXPECT_OK(kc::grouped_weight_grad(h.get(), dt, dw_dt, ddw.get(), dd.get(), din.get(), kOffsets.data(), E,
                                      O, I, acc, ps, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<double> want(E * O * I, 0.0), mag(E * O * I, 0.0);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = kOffsets[e], n = kOffsets[e + 1] - r0;
      if (n == 0) continue;
      std::vector<double> w1, m1;
      rowmajor_gemm(true, false, O, I, n, d.data() + r0 * O, in.data() + r0 * I, w1, &m1);
      for (int64_t i = 0; i < O * I; ++i) want[e * O * I + i] = w1[i], mag[e * O * I + i] = m1[i];
    }
    if (acc)
      for (int64_t i = 0; i < E * O * I; ++i) want[i] += C0[i], mag[i] += std::fabs(C0[i]);
    expect_gemm_close(ddw.download(), want, mag, dw_dt, std::string("dW into ") + name(dw_dt) + " " + tag);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, GroupedGemm,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kBFloat16),
                                            ::testing::Values(std::pair<int64_t, int64_t>{64, 96},
                                                              std::pair<int64_t, int64_t>{37, 53}),
                                            ::testing::Bool(), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<GroupedParam>& i) {
                           // No structured binding here: its commas would split the macro's arguments.
                           const auto& shape = std::get<1>(i.param);
                           return std::string(name(std::get<0>(i.param))) + "_O" +
                                  std::to_string(shape.first) + "_I" + std::to_string(shape.second) +
                                  (std::get<2>(i.param) ? "_scratch" : "_noscratch") +
                                  (std::get<3>(i.param) ? "_accumulate" : "_write");
                         });

TEST(GroupedGemm, NoRowsAtAll) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  CublasHandle h;
  const std::vector<int64_t> off(5, 0);
  const int64_t E = 4, O = 8, I = 8;
  AnyBuf dw(DType::kFloat32, std::vector<float>(E * O * I, 2.0f));
  EXPECT_OK(kc::grouped_weight_grad(h.get(), DType::kFloat32, DType::kFloat32, dw.get(), nullptr, nullptr,
                                    off.data(), E, O, I, true, nullptr, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dw.download(), std::vector<float>(E * O * I, 2.0f));
  EXPECT_OK(kc::grouped_weight_grad(h.get(), DType::kFloat32, DType::kFloat32, dw.get(), nullptr, nullptr,
                                    off.data(), E, O, I, false, nullptr, nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dw.download(), std::vector<float>(E * O * I, 0.0f));
  EXPECT_OK(kc::grouped_mm_nt(h.get(), DType::kFloat32, nullptr, nullptr, nullptr, off.data(), E, O, I, false,
                              nullptr, nullptr));
}

// ---- The MoE driver against a CPU implementation of the whole layer ----

struct Layer {
  kc::MoeConfig cfg;
  std::vector<float> x, wr, wg, wu, wd;  // as stored: bf16-rounded for bf16
};

Layer make_layer(const kc::MoeConfig& cfg, unsigned seed) {
  std::mt19937 rng(seed);
  const int64_t T = cfg.T, C = cfg.C, F = cfg.F, E = cfg.E;
  const float sc = 1.0f / std::sqrt(float(C)), sf = 1.0f / std::sqrt(float(F));
  Layer l;
  l.cfg = cfg;
  l.x = as_stored(cfg.dtype, normal_vector(T * C, rng));
  l.wr = as_stored(cfg.dtype, normal_vector(E * C, rng, 3.0f * sc));  // decisive routing: clear top-K margins
  l.wg = as_stored(cfg.dtype, normal_vector(E * F * C, rng, sc));
  l.wu = as_stored(cfg.dtype, normal_vector(E * F * C, rng, sc));
  l.wd = as_stored(cfg.dtype, normal_vector(E * C * F, rng, sf));
  return l;
}

// The device side: weights, input, output, workspace, cuBLAS handle.
struct DeviceLayer {
  explicit DeviceLayer(const Layer& l)
      : cfg(l.cfg),
        x(cfg.dtype, l.x),
        wr(cfg.dtype, l.wr),
        wg(cfg.dtype, l.wg),
        wu(cfg.dtype, l.wu),
        wd(cfg.dtype, l.wd),
        y(cfg.dtype, static_cast<size_t>(cfg.T * cfg.C)),
        work(kc::moe_workspace_bytes(cfg)),
        host_offsets(cfg.E + 1, -1) {
    EXPECT_GT(work.size(), 0u);
    const int rc = kc::moe_workspace_carve(cfg, work.get(), work.size(), host_offsets.data(), &ws);
    EXPECT_EQ(rc, 0) << kc::error_string(rc);
    weights = {wr.get(), wg.get(), wu.get(), wd.get()};
  }
  kc::MoeConfig cfg;
  AnyBuf x, wr, wg, wu, wd, y;
  DevBuf<char> work;
  std::vector<int64_t> host_offsets;
  kc::MoeWorkspace ws;
  kc::MoeWeights weights;
  CublasHandle cublas;
};

template <typename T>
std::vector<T> from_device(const T* p, int64_t n) {
  std::vector<T> v(n);
  if (n > 0) {
    EXPECT_EQ(cudaMemcpy(v.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  return v;
}

double silu(double a) {
  return a / (1.0 + std::exp(-a));
}

// Softmax of x Wr^T in double, [T, E].
std::vector<double> cpu_probs(const Layer& l) {
  const int64_t T = l.cfg.T, C = l.cfg.C, E = l.cfg.E;
  std::vector<double> p(T * E);
  for (int64_t t = 0; t < T; ++t) {
    double mx = -1e300, s = 0;
    for (int64_t e = 0; e < E; ++e) {
      double z = 0;
      for (int64_t c = 0; c < C; ++c) z += double(l.x[t * C + c]) * l.wr[e * C + c];
      p[t * E + e] = z;
      mx = std::max(mx, z);
    }
    for (int64_t e = 0; e < E; ++e) s += p[t * E + e] = std::exp(p[t * E + e] - mx);
    for (int64_t e = 0; e < E; ++e) p[t * E + e] /= s;
  }
  return p;
}

// The gates of the given choices under probabilities p.
std::vector<double> cpu_gates(const Layer& l, const std::vector<double>& p, const std::vector<int32_t>& ids) {
  const int64_t T = l.cfg.T, E = l.cfg.E, K = l.cfg.K;
  std::vector<double> g(T * K);
  for (int64_t t = 0; t < T; ++t) {
    double sel = 0;
    for (int64_t k = 0; k < K; ++k) sel += p[t * E + ids[t * K + k]];
    for (int64_t k = 0; k < K; ++k)
      g[t * K + k] = p[t * E + ids[t * K + k]] / (l.cfg.renormalize ? sel : 1.0);
  }
  return g;
}

// y of the layer with the given choices. For bf16 the values the GPU stores in bf16 (a, b, h, the expert
// output rows, y) are rounded here too, so that only accumulation order and rounding-boundary flips differ.
std::vector<float> cpu_forward(const Layer& l, const std::vector<double>& p,
                               const std::vector<int32_t>& ids) {
  const int64_t T = l.cfg.T, C = l.cfg.C, F = l.cfg.F, K = l.cfg.K;
  const bool half = l.cfg.dtype == DType::kBFloat16;
  auto r = [half](double v) { return half ? double(cudatest::to_float(cudatest::to_bf16(float(v)))) : v; };
  const auto g = cpu_gates(l, p, ids);
  std::vector<double> y(T * C, 0.0);
  std::vector<double> h(F);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = ids[t * K + k];
      for (int64_t f = 0; f < F; ++f) {
        double a = 0, b = 0;
        for (int64_t c = 0; c < C; ++c) {
          a += double(l.wg[(e * F + f) * C + c]) * l.x[t * C + c];
          b += double(l.wu[(e * F + f) * C + c]) * l.x[t * C + c];
        }
        a = r(a), b = r(b);
        h[f] = r(g[t * K + k] * silu(a) * b);
      }
      for (int64_t c = 0; c < C; ++c) {
        double o = 0;
        for (int64_t f = 0; f < F; ++f) o += double(l.wd[(e * C + c) * F + f]) * h[f];
        y[t * C + c] += r(o);
      }
    }
  std::vector<float> out(T * C);
  for (int64_t i = 0; i < T * C; ++i) out[i] = static_cast<float>(r(y[i]));
  return out;
}

// |got - want| <= tol (|want| + rms(want)): relative, with the output's scale as the floor near zero.
void expect_scaled_close(const std::vector<float>& got, const std::vector<float>& want, float tol,
                         const std::string& what) {
  cudatest::expect_close(got, want, tol, cudatest::rms(want) + 1e-30f, what);
}

// The routing in the workspace: probabilities as the CPU's, the choices a top-K of them, and the sorted
// layout exactly the CPU stable counting sort of those choices.
std::vector<int32_t> check_routing(const Layer& l, DeviceLayer& d, const std::vector<double>& p) {
  const int64_t T = l.cfg.T, E = l.cfg.E, K = l.cfg.K, N = T * K;
  const auto probs = from_device(d.ws.probs, T * E);
  for (int64_t i = 0; i < T * E; ++i) EXPECT_NEAR(probs[i], p[i], 1e-5) << "prob " << i;
  const auto ids = from_device(d.ws.topk_id, T * K);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<bool> chosen(E, false);
    double low = 2;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = ids[t * K + k];
      EXPECT_TRUE(e >= 0 && e < E && !chosen[e]) << "token " << t;
      if (e < 0 || e >= E) return ids;
      chosen[e] = true;
      low = std::min(low, p[t * E + e]);
    }
    for (int64_t e = 0; e < E; ++e) {
      if (!chosen[e]) {
        EXPECT_LE(p[t * E + e], low + 1e-5) << "token " << t << " left out expert " << e;
      }
    }
  }
  std::vector<int64_t> off(E + 1, 0), tok(N), row(N);
  for (int32_t e : ids) ++off[e + 1];
  for (int64_t e = 0; e < E; ++e) off[e + 1] += off[e];
  std::vector<int64_t> cur(off.begin(), off.end() - 1);
  for (int64_t q = 0; q < N; ++q) {
    const int64_t slot = cur[ids[q]]++;
    tok[slot] = q / K;
    row[q] = slot;
  }
  EXPECT_EQ(d.host_offsets, off);
  EXPECT_EQ(from_device(d.ws.expert_offsets, E + 1), off);
  EXPECT_EQ(from_device(d.ws.token_index, N), tok);
  EXPECT_EQ(from_device(d.ws.row_of_assignment, N), row);
  return ids;
}

}  // namespace

std::string describe(const kc::MoeConfig& c) {
  return "T " + std::to_string(c.T) + " C " + std::to_string(c.C) + " F " + std::to_string(c.F) + " E " +
         std::to_string(c.E) + " K " + std::to_string(c.K) + " " + name(c.dtype) +
         (c.grouped_gemm ? " grouped" : " loop") +
         (c.deterministic_combine ? " gather-combine" : " atomic-combine") + (c.renormalize ? " renorm" : "");
}

namespace {

kc::MoeConfig config(int64_t T, int64_t C, int64_t F, int64_t E, int64_t K, DType dt, bool grouped = true,
                     bool deterministic = true, bool renorm = true) {
  kc::MoeConfig c;
  c.T = T, c.C = C, c.F = F, c.E = E, c.K = K, c.dtype = dt;
  c.grouped_gemm = grouped, c.deterministic_combine = deterministic, c.renormalize = renorm;
  return c;
}

// Aligned shapes (grouped cuBLAS call); C 40, F 52 (in bf16, rows of F are 104 bytes: the per-expert loop
// for two of the three products); an explicit loop; few tokens for many experts (empty experts); a
// decode-like single token; both combines, both dtypes, with and without renormalisation.
const kc::MoeConfig kDriverCases[] = {
    config(67, 64, 96, 8, 2, DType::kFloat32),
    config(67, 64, 96, 8, 2, DType::kBFloat16),
    config(67, 64, 96, 8, 2, DType::kBFloat16, false, false),
    config(67, 64, 96, 8, 2, DType::kFloat32, true, false, false),
    config(33, 40, 52, 5, 3, DType::kFloat32, true, false),
    config(33, 40, 52, 5, 3, DType::kBFloat16),
    config(5, 64, 96, 16, 2, DType::kBFloat16),
    config(1, 64, 32, 64, 8, DType::kBFloat16, true, true, false),
};

class MoeDriver : public ::testing::TestWithParam<kc::MoeConfig> {};

}  // namespace
}  // namespace cudatest_moe

// GoogleTest finds the printer of a parameter by argument-dependent lookup: in MoeConfig's namespace.
namespace moeforge::kernels::cuda {
void PrintTo(const MoeConfig& c, std::ostream* os) {
  *os << cudatest_moe::describe(c);
}
}  // namespace moeforge::kernels::cuda

namespace cudatest_moe {
namespace {

TEST_P(MoeDriver, ForwardMatchesCpuLayer) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const Layer l = make_layer(GetParam(), 21);
  DeviceLayer d(l);
  EXPECT_OK(kc::moe_forward(l.cfg, d.weights, d.x.get(), d.y.get(), d.ws, d.cublas.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto p = cpu_probs(l);
  const auto ids = check_routing(l, d, p);
  ASSERT_TRUE(std::all_of(ids.begin(), ids.end(), [&](int32_t e) { return e >= 0 && e < l.cfg.E; }));
  // float32: two chained GEMMs (C and F terms) and __expf, a few ulp of the output scale each, so 1e-4 of
  // it. bf16: the CPU rounds at the same points; a sum on either side of a rounding boundary moves one
  // intermediate by a bf16 ulp (2^-8), propagated through the next product: 2^-6 of the output scale.
  const float tol = l.cfg.dtype == DType::kFloat32 ? 1e-4f : 1.0f / 64;
  expect_scaled_close(d.y.download(), cpu_forward(l, p, ids), tol, describe(l.cfg));

  // A second call on the same workspace gives the same result (no state left behind); with the gather
  // combine, bitwise.
  const auto y1 = d.y.download();
  EXPECT_OK(kc::moe_forward(l.cfg, d.weights, d.x.get(), d.y.get(), d.ws, d.cublas.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (l.cfg.deterministic_combine)
    EXPECT_EQ(d.y.download(), y1);
  else
    expect_scaled_close(d.y.download(), y1, 1e-5f, "repeat");
}

// Gradients of the layer in double with the GPU's choices: the expert path as FusedMoEFn::backward and the
// router path through renormalisation and softmax, plus d_probs.
struct CpuGrads {
  std::vector<float> dx, dwr, dwg, dwu, dwd;
};
CpuGrads cpu_backward(const Layer& l, const std::vector<double>& p, const std::vector<int32_t>& ids,
                      const std::vector<float>& dy, const std::vector<float>& d_probs) {
  const int64_t T = l.cfg.T, C = l.cfg.C, F = l.cfg.F, E = l.cfg.E, K = l.cfg.K;
  const auto g = cpu_gates(l, p, ids);
  std::vector<double> dx(T * C, 0.0), dwr(E * C, 0.0), dwg(E * F * C, 0.0), dwu(E * F * C, 0.0),
      dwd(E * C * F, 0.0), dg(T * K, 0.0);
  std::vector<double> a(F), b(F), dh(F);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = ids[t * K + k];
      const double gate = g[t * K + k];
      for (int64_t f = 0; f < F; ++f) {
        a[f] = b[f] = 0;
        for (int64_t c = 0; c < C; ++c) {
          a[f] += double(l.wg[(e * F + f) * C + c]) * l.x[t * C + c];
          b[f] += double(l.wu[(e * F + f) * C + c]) * l.x[t * C + c];
        }
        dh[f] = 0;
        for (int64_t c = 0; c < C; ++c) dh[f] += double(l.wd[(e * C + c) * F + f]) * dy[t * C + c];
      }
      for (int64_t f = 0; f < F; ++f) {
        const double s = 1.0 / (1.0 + std::exp(-a[f])), sa = a[f] * s;
        const double h = gate * sa * b[f];
        for (int64_t c = 0; c < C; ++c) dwd[(e * C + c) * F + f] += dy[t * C + c] * h;
        dg[t * K + k] += dh[f] * sa * b[f];
        const double db = gate * dh[f] * sa, da = gate * dh[f] * b[f] * s * (1.0 + a[f] * (1.0 - s));
        for (int64_t c = 0; c < C; ++c) {
          dwg[(e * F + f) * C + c] += da * l.x[t * C + c];
          dwu[(e * F + f) * C + c] += db * l.x[t * C + c];
          dx[t * C + c] += da * l.wg[(e * F + f) * C + c] + db * l.wu[(e * F + f) * C + c];
        }
      }
    }
  // Router: d_p from the gates (renormalised or not) and d_probs, then the softmax backward.
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> dp(E);
    for (int64_t e = 0; e < E; ++e) dp[e] = d_probs.empty() ? 0.0 : d_probs[t * E + e];
    double sel = 0, dot = 0;
    for (int64_t k = 0; k < K; ++k) sel += p[t * E + ids[t * K + k]], dot += dg[t * K + k] * g[t * K + k];
    for (int64_t k = 0; k < K; ++k)
      dp[ids[t * K + k]] += l.cfg.renormalize ? (dg[t * K + k] - dot) / sel : dg[t * K + k];
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += p[t * E + e] * dp[e];
    for (int64_t e = 0; e < E; ++e) {
      const double dz = p[t * E + e] * (dp[e] - s);
      for (int64_t c = 0; c < C; ++c) {
        dwr[e * C + c] += dz * l.x[t * C + c];
        dx[t * C + c] += dz * l.wr[e * C + c];
      }
    }
  }
  auto f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  return {f(dx), f(dwr), f(dwg), f(dwu), f(dwd)};
}

TEST_P(MoeDriver, BackwardMatchesCpuLayer) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const Layer l = make_layer(GetParam(), 22);
  const int64_t T = l.cfg.T, C = l.cfg.C, F = l.cfg.F, E = l.cfg.E;
  DeviceLayer d(l);
  EXPECT_OK(kc::moe_forward(l.cfg, d.weights, d.x.get(), d.y.get(), d.ws, d.cublas.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto p = cpu_probs(l);
  const auto ids = check_routing(l, d, p);
  ASSERT_TRUE(std::all_of(ids.begin(), ids.end(), [&](int32_t e) { return e >= 0 && e < l.cfg.E; }));

  std::mt19937 rng(23);
  const auto dy = as_stored(l.cfg.dtype, normal_vector(T * C, rng));
  const auto d_probs = normal_vector(T * E, rng, 0.1f);
  // Accumulate into prefilled float32 gradients, the gradient-accumulation case (beta = 1).
  const auto pre_r = normal_vector(E * C, rng), pre_g = normal_vector(E * F * C, rng),
             pre_u = normal_vector(E * F * C, rng), pre_d = normal_vector(E * C * F, rng);
  AnyBuf ddy(l.cfg.dtype, dy), ddx(l.cfg.dtype, static_cast<size_t>(T * C));
  AnyBuf dwr(DType::kFloat32, pre_r), dwg(DType::kFloat32, pre_g), dwu(DType::kFloat32, pre_u),
      dwd(DType::kFloat32, pre_d);
  DevBuf<float> ddp(d_probs);
  kc::MoeGrads g;
  g.dx = ddx.get(), g.d_router = dwr.get(), g.dw_gate = dwg.get(), g.dw_up = dwu.get(), g.dw_down = dwd.get();
  g.grad_dtype = DType::kFloat32;
  g.accumulate = true;
  g.d_probs = ddp.get();
  EXPECT_OK(kc::moe_backward(l.cfg, d.weights, d.x.get(), ddy.get(), g, d.ws, d.cublas.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  auto want = cpu_backward(l, p, ids, dy, d_probs);
  // float32: as the forward. bf16: dh, gate * h, da and db are rounded to bf16 on the GPU (not emulated
  // here) and the router GEMMs take d_logits in bf16, a few bf16 ulps (2^-8 each) of the gradients' scale.
  const float tol = l.cfg.dtype == DType::kFloat32 ? 1e-4f : 1.0f / 32;
  const std::string what = describe(l.cfg);
  expect_scaled_close(ddx.download(), want.dx, tol, "dx " + what);
  // The prefilled values are O(1) like the gradients; compare the added part against its own scale.
  auto minus = [](std::vector<float> v, const std::vector<float>& pre) {
    for (size_t i = 0; i < v.size(); ++i) v[i] -= pre[i];
    return v;
  };
  expect_scaled_close(minus(dwr.download(), pre_r), want.dwr, tol, "d_router " + what);
  expect_scaled_close(minus(dwg.download(), pre_g), want.dwg, tol, "dw_gate " + what);
  expect_scaled_close(minus(dwu.download(), pre_u), want.dwu, tol, "dw_up " + what);
  expect_scaled_close(minus(dwd.download(), pre_d), want.dwd, tol, "dw_down " + what);

  // Written, not accumulated: experts without rows get zero gradients.
  g.accumulate = false;
  g.d_probs = nullptr;
  EXPECT_OK(kc::moe_backward(l.cfg, d.weights, d.x.get(), ddy.get(), g, d.ws, d.cublas.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  want = cpu_backward(l, p, ids, dy, {});
  expect_scaled_close(ddx.download(), want.dx, tol, "dx without d_probs " + what);
  expect_scaled_close(dwr.download(), want.dwr, tol, "d_router written " + what);
  expect_scaled_close(dwg.download(), want.dwg, tol, "dw_gate written " + what);
  expect_scaled_close(dwd.download(), want.dwd, tol, "dw_down written " + what);
}

INSTANTIATE_TEST_SUITE_P(Shapes, MoeDriver, ::testing::ValuesIn(kDriverCases),
                         [](const ::testing::TestParamInfo<kc::MoeConfig>& i) {
                           std::string n = describe(i.param);
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

TEST(MoeDriverLimits, NoTokens) {
  if (!cudatest::have_device()) GTEST_SKIP() << "no CUDA device";
  const Layer l = make_layer(config(0, 64, 96, 8, 2, DType::kBFloat16), 3);
  DeviceLayer d(l);
  EXPECT_OK(kc::moe_forward(l.cfg, d.weights, d.x.get(), d.y.get(), d.ws, d.cublas.get(), nullptr));
  EXPECT_EQ(d.host_offsets, std::vector<int64_t>(9, 0));
  AnyBuf dwr(DType::kFloat32, std::vector<float>(8 * 64, 1.0f));
  AnyBuf dwg(DType::kFloat32, std::vector<float>(8 * 96 * 64, 1.0f)), dwu(DType::kFloat32, 8 * 96 * 64),
      dwd(DType::kFloat32, 8 * 64 * 96);
  kc::MoeGrads g;
  g.d_router = dwr.get(), g.dw_gate = dwg.get(), g.dw_up = dwu.get(), g.dw_down = dwd.get();
  EXPECT_OK(kc::moe_backward(l.cfg, d.weights, d.x.get(), nullptr, g, d.ws, d.cublas.get(), nullptr));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dwr.download(), std::vector<float>(8 * 64, 0.0f));
  EXPECT_EQ(dwg.download(), std::vector<float>(8 * 96 * 64, 0.0f));
}

TEST(MoeDriverLimits, ConfigChecksNeedNoDevice) {
  EXPECT_TRUE(kc::moe_config_ok(config(4096, 512, 1024, 16, 2, DType::kBFloat16)));
  EXPECT_TRUE(kc::moe_config_ok(config(4096, 512, 256, 64, 8, DType::kBFloat16)));
  EXPECT_FALSE(kc::moe_config_ok(config(16, 512, 256, 300, 8, DType::kBFloat16)));  // E > 256
  EXPECT_FALSE(kc::moe_config_ok(config(16, 512, 256, 4, 8, DType::kBFloat16)));    // K > E
  EXPECT_FALSE(kc::moe_config_ok(config(16, 0, 256, 64, 8, DType::kBFloat16)));
  EXPECT_EQ(kc::moe_workspace_bytes(config(16, 512, 256, 4, 8, DType::kBFloat16)), 0u);
  // Every buffer 256-byte aligned, and large enough: the row buffers alone need 2 [N, C] + 4 [N, F].
  const auto c = config(4096, 512, 1024, 16, 2, DType::kBFloat16);
  const size_t bytes = kc::moe_workspace_bytes(c);
  EXPECT_GE(bytes, size_t(2) * 8192 * (2 * 512 + 4 * 1024));
  kc::MoeWorkspace ws;
  std::vector<int64_t> host(17);
  void* fake = reinterpret_cast<void*>(uintptr_t{1} << 30);  // never dereferenced by carving
  ASSERT_EQ(kc::moe_workspace_carve(c, fake, bytes, host.data(), &ws), 0);
  for (const void* p : std::initializer_list<const void*>{ws.logits, ws.token_index, ws.rows_c1, ws.rows_c2,
                                                          ws.a, ws.b, ws.f1, ws.f2, ws.d_logits})
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u);
  // The last buffer ends inside the allocation.
  EXPECT_LE(reinterpret_cast<uintptr_t>(ws.d_logits_cast) + 2 * 4096 * 16, (uintptr_t{1} << 30) + bytes);
  EXPECT_NE(kc::moe_workspace_carve(c, fake, bytes - 1, host.data(), &ws), 0);
  EXPECT_NE(kc::moe_workspace_carve(c, fake, bytes, nullptr, &ws), 0);
}

}  // namespace
}  // namespace cudatest_moe
