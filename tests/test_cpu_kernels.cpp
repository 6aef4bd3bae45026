// The CPU kernels called directly (kernels/cpu), against double-precision sums: every code path of the
// small GEMM (1-7 rows streamed, 8+ rows in register tiles with row and output tails, input widths that
// leave a remainder after the vector lanes) and an output stride wider than the block.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "kernels/cpu/gelu.h"
#include "kernels/cpu/small_mm.h"
#include "kernels/cpu/small_mm_bf16.h"

namespace {

// The kernel under test: the one the CPU picks, or the float build for one instruction set.
template <typename T>
bool run_small_mm(const char* isa, T* out, int64_t ld, const T* in, const T* w, int64_t n, int64_t n_out,
                  int64_t n_in) {
  if constexpr (std::is_same_v<T, float>)
    if (isa) return moeforge::kernels::cpu::small_mm_nt_isa(isa, out, ld, in, w, n, n_out, n_in);
  moeforge::kernels::cpu::small_mm_nt(out, ld, in, w, n, n_out, n_in);
  return true;
}

template <typename T>
void check_small_mm(int64_t n, int64_t n_out, int64_t n_in, const char* isa = nullptr) {
  std::mt19937 rng(static_cast<unsigned>(n * 1000003 + n_out * 1009 + n_in));
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<T> in(n * n_in), w(n_out * n_in);
  for (auto& v : in) v = static_cast<T>(u(rng));
  for (auto& v : w) v = static_cast<T>(u(rng));
  const int64_t ld = n_out + 3;  // a block of a wider output: the columns past n_out must stay untouched
  std::vector<T> out(std::max<int64_t>(n, 1) * ld, T(-7));
  if (!run_small_mm(isa, out.data(), ld, in.data(), w.data(), n, n_out, n_in)) return;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t o = 0; o < n_out; ++o) {
      double ref = 0, mag = 0;
      for (int64_t i = 0; i < n_in; ++i) {
        ref += double(in[r * n_in + i]) * double(w[o * n_in + i]);
        mag += std::fabs(double(in[r * n_in + i]) * double(w[o * n_in + i]));
      }
      // Summation in another order: each partial sum rounds once, so the error is below
      // n_in * eps * sum|x_i w_i| (the classic bound; typically far less).
      const double eps = std::numeric_limits<T>::epsilon();
      ASSERT_NEAR(double(out[r * ld + o]), ref, double(n_in) * eps * mag + 1e-30)
          << (isa ? isa : "picked") << " n=" << n << " n_out=" << n_out << " n_in=" << n_in << " r=" << r
          << " o=" << o;
    }
    for (int64_t o = n_out; o < ld; ++o) ASSERT_EQ(out[r * ld + o], T(-7)) << "wrote past n_out";
  }
}

TEST(CpuKernels, SmallMMFloatMatchesDoubleSums) {
  for (int64_t n : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 19, 33})
    for (int64_t n_out : {1, 5, 6, 7, 13, 64})
      for (int64_t n_in : {1, 15, 16, 17, 64, 515}) check_small_mm<float>(n, n_out, n_in);
}

TEST(CpuKernels, SmallMMFloatBuildsForEachInstructionSetMatch) {
  float out = 0, in = 1, w = 1;
  EXPECT_TRUE(moeforge::kernels::cpu::small_mm_nt_isa("generic", &out, 1, &in, &w, 1, 1, 1));
  EXPECT_FALSE(moeforge::kernels::cpu::small_mm_nt_isa("sse9", &out, 1, &in, &w, 1, 1, 1));
  for (const char* isa : {"avx512", "avx2", "generic"}) {
    if (!moeforge::kernels::cpu::small_mm_nt_isa(isa, &out, 1, &in, &w, 1, 1, 1)) {
      std::cout << "[ INFO ] no " << isa << " on this CPU; its build is not checked\n";
      continue;
    }
    for (int64_t n : {1, 2, 3, 4, 7, 8, 9, 13, 33})
      for (int64_t n_out : {1, 6, 13})
        for (int64_t n_in : {1, 17, 515}) check_small_mm<float>(n, n_out, n_in, isa);
  }
}

TEST(CpuKernels, SmallMMDoubleMatchesDoubleSums) {
  for (int64_t n : {1, 3, 8, 17})
    for (int64_t n_out : {1, 7, 64})
      for (int64_t n_in : {1, 17, 515}) check_small_mm<double>(n, n_out, n_in);
}

// bf16 bit patterns of random values: the upper half of a float32, rounded to nearest even.
std::vector<uint16_t> random_bf16(int64_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<uint16_t> out(static_cast<size_t>(count));
  for (auto& v : out) {
    const float f = u(rng);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    v = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
  return out;
}

double bf16_value(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void check_small_mm_bf16(int64_t n, int64_t n_out, int64_t n_in, const char* isa) {
  std::mt19937 rng(static_cast<unsigned>(n * 1000003 + n_out * 1009 + n_in));
  const auto in = random_bf16(n * n_in, rng), w = random_bf16(n_out * n_in, rng);
  const int64_t ld = n_out + 3;  // a block of a wider output: the columns past n_out must stay untouched
  std::vector<float> out(std::max<int64_t>(n, 1) * ld, -7.f);
  if (isa) {
    if (!moeforge::kernels::cpu::small_mm_nt_bf16_isa(isa, out.data(), ld, in.data(), w.data(), n, n_out,
                                                      n_in))
      return;
  } else {
    moeforge::kernels::cpu::small_mm_nt_bf16(out.data(), ld, in.data(), w.data(), n, n_out, n_in);
  }
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t o = 0; o < n_out; ++o) {
      double ref = 0, mag = 0;
      for (int64_t i = 0; i < n_in; ++i) {
        const double p = bf16_value(in[r * n_in + i]) * bf16_value(w[o * n_in + i]);
        ref += p;
        mag += std::fabs(p);
      }
      // The product of two bf16 values is exact in float32 (8 + 8 significant bits): only the float32 sums
      // round, in another order than the float64 reference, so the error is below n_in * eps_f32 *
      // sum|x_i w_i| (the classic bound). Random values in (-1, 1) stay far from vdpbf16ps's flushed
      // subnormals.
      const double eps = std::numeric_limits<float>::epsilon();
      ASSERT_NEAR(double(out[r * ld + o]), ref, double(n_in) * eps * mag + 1e-30)
          << (isa ? isa : "picked") << " n=" << n << " n_out=" << n_out << " n_in=" << n_in << " r=" << r
          << " o=" << o;
    }
    for (int64_t o = n_out; o < ld; ++o) ASSERT_EQ(out[r * ld + o], -7.f) << "wrote past n_out";
  }
}

TEST(CpuKernels, SmallMMBf16MatchesDoubleSumsOfTheBf16Values) {
  std::cout << "[ INFO ] small_mm_nt_bf16 runs on " << moeforge::kernels::cpu::small_mm_nt_bf16_picked()
            << "\n";
  for (const char* isa : {static_cast<const char*>(nullptr), "avx512bf16", "avx2", "generic"}) {
    uint16_t one = 0x3F80;  // 1.0
    float out = 0;
    if (isa && !moeforge::kernels::cpu::small_mm_nt_bf16_isa(isa, &out, 1, &one, &one, 1, 1, 1)) {
      std::cout << "[ INFO ] no " << isa << " on this CPU; its build is not checked\n";
      continue;
    }
    // Widths around the vector lengths (8, 16, 32, 64 values) and their tails; rows past a block of 4.
    for (int64_t n : {0, 1, 2, 3, 4, 5, 7, 9})
      for (int64_t n_out : {1, 7, 9, 17})
        for (int64_t n_in : {1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 515})
          check_small_mm_bf16(n, n_out, n_in, isa);
  }
  float out = 0;
  uint16_t one = 0x3F80;
  EXPECT_FALSE(moeforge::kernels::cpu::small_mm_nt_bf16_isa("sse9", &out, 1, &one, &one, 1, 1, 1));
}

TEST(CpuKernels, GeluMatchesErfFormulaIncludingLargeInputs) {
  // Inputs from deep in either tail (where exp(-x^2 / 2) is clamped and erf saturates) through 0, with a
  // gate, against the formula in double.
  const std::vector<float> xs = {-1e4f, -60.f, -9.f, -3.f, -1.f, -0.1f, 0.f, 0.1f, 1.f, 3.f, 9.f, 60.f, 1e4f};
  const int64_t n = 2, width = static_cast<int64_t>(xs.size());
  std::vector<float> a, dh, h(n * width), da(n * width), d_gate(n);
  for (int64_t r = 0; r < n; ++r)
    for (float x : xs) {
      a.push_back(x);
      dh.push_back(0.5f + 0.1f * float(r));
    }
  const std::vector<float> gate = {0.25f, 2.f};
  moeforge::kernels::cpu::gelu_forward(h.data(), a.data(), gate.data(), n, width);
  moeforge::kernels::cpu::gelu_backward(da.data(), d_gate.data(), dh.data(), a.data(), gate.data(), n, width);
  for (int64_t r = 0; r < n; ++r) {
    double dot = 0;
    for (int64_t j = 0; j < width; ++j) {
      const double x = a[r * width + j], cdf = 0.5 * (1 + std::erf(x / std::sqrt(2.0)));
      const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI), d = dh[r * width + j];
      dot += d * x * cdf;
      // float32 results of O(|x|) values: a few ulp of libmvec's erf/exp and of the products, relative
      EXPECT_NEAR(h[r * width + j], gate[r] * x * cdf, 1e-6 * (1 + std::fabs(x))) << "x=" << x;
      EXPECT_NEAR(da[r * width + j], gate[r] * d * (cdf + x * pdf), 1e-6) << "x=" << x;
      EXPECT_TRUE(std::isfinite(da[r * width + j]));
    }
    // d_gate sums the row: float32 accumulation of 13 terms up to 1e4 in size
    EXPECT_NEAR(d_gate[r], dot, 1e-6 * 2e4);
  }
}

}  // namespace
