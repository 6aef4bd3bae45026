// The cuBLAS GEMMs of the CUDA MoE path (kernels/cuda/grouped_gemm.h) against CPU triple loops, and the
// row-major -> column-major mapping they rely on (kernels/cuda/gemm_layout.h). The GemmLayout tests are
// host-only and run everywhere; every other test skips itself when no CUDA device is present.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/cuda/gemm_layout.h"
#include "kernels/cuda/grouped_gemm.h"

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

  {  // Forward: out[rows e] (+)= in[rows e] @ W[e]^T
    const auto in = as_stored(dt, normal_vector(N * I, rng)), C0 = as_stored(dt, normal_vector(N * O, rng));
    AnyBuf din(dt, in), dout(dt, C0);
    EXPECT_OK(kc::grouped_mm_nt(h.get(), dt, dout.get(), din.get(), dW.get(), kOffsets.data(), E, O, I, acc,
                                ps, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<double> want(N * O), mag(N * O);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = kOffsets[e], n = kOffsets[e + 1] - r0;
      std::vector<double> w1, m1;
      rowmajor_gemm(false, true, n, O, I, in.data() + r0 * I, W.data() + e * O * I, w1, &m1);
      for (int64_t i = 0; i < n * O; ++i) want[r0 * O + i] = w1[i], mag[r0 * O + i] = m1[i];
    }
    if (acc)
      for (int64_t i = 0; i < N * O; ++i) want[i] += C0[i], mag[i] += std::fabs(C0[i]);
    expect_gemm_close(dout.download(), want, mag, dt, "NT " + tag);
  }
  {  // Data gradient: out[rows e] (+)= in[rows e] @ W[e]
    const auto in = as_stored(dt, normal_vector(N * O, rng)), C0 = as_stored(dt, normal_vector(N * I, rng));
    AnyBuf din(dt, in), dout(dt, C0);
    EXPECT_OK(kc::grouped_mm_nn(h.get(), dt, dout.get(), din.get(), dW.get(), kOffsets.data(), E, O, I, acc,
                                ps, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<double> want(N * I), mag(N * I);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = kOffsets[e], n = kOffsets[e + 1] - r0;
      std::vector<double> w1, m1;
      rowmajor_gemm(false, false, n, I, O, in.data() + r0 * O, W.data() + e * O * I, w1, &m1);
      for (int64_t i = 0; i < n * I; ++i) want[r0 * I + i] = w1[i], mag[r0 * I + i] = m1[i];
    }
    if (acc)
      for (int64_t i = 0; i < N * I; ++i) want[i] += C0[i], mag[i] += std::fabs(C0[i]);
    expect_gemm_close(dout.download(), want, mag, dt, "NN " + tag);
  }
  // Weight gradient: dw[e] (+)= d[rows e]^T @ in[rows e], into the activations' type and into float32.
  for (const DType dw_dt : {dt, DType::kFloat32}) {
    if (dw_dt == DType::kFloat32 && dt == DType::kFloat32 && !use_scratch) continue;  // covered above
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
                                            ::testing::Bool(), ::testing::Bool()));

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

}  // namespace
