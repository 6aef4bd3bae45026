// Helpers of the CUDA kernel tests: device detection, RAII device buffers, host bf16 rounding, and
// comparisons with a worst-case report. No LibTorch.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/types.h"

namespace cudatest {

namespace kc = moeforge::kernels::cuda;

inline bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// A kernel entry point's return code, readable in a failed assertion.
#define EXPECT_OK(expr)                                                                 \
  do {                                                                                  \
    const int rc_ = (expr);                                                             \
    ASSERT_EQ(rc_, 0) << #expr << ": " << ::moeforge::kernels::cuda::error_string(rc_); \
  } while (0)

// Host bf16: round to nearest even, as __float2bfloat16_rn (NaN kept quiet).
inline kc::bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return kc::bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return kc::bf16{static_cast<uint16_t>(u >> 16)};
}
inline float to_float(kc::bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline std::vector<kc::bf16> to_bf16(const std::vector<float>& v) {
  std::vector<kc::bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_bf16(v[i]);
  return out;
}
inline std::vector<float> to_float(const std::vector<kc::bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}
// v rounded through bf16 (the values a bf16 kernel actually sees).
inline std::vector<float> bf16_round(const std::vector<float>& v) {
  return to_float(to_bf16(v));
}

// A device buffer of n elements of T, freed on scope exit (also when an assertion returns early).
template <typename T>
class DevBuf {
 public:
  explicit DevBuf(size_t n) : n_(n) {
    if (n_ > 0) {
      EXPECT_EQ(cudaMalloc(&p_, sizeof(T) * n_), cudaSuccess);
    }
  }
  explicit DevBuf(const std::vector<T>& v) : DevBuf(v.size()) { upload(v); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() {
    if (p_) cudaFree(p_);
  }
  void upload(const std::vector<T>& v) {
    ASSERT_EQ(v.size(), n_);
    if (n_ > 0) {
      EXPECT_EQ(cudaMemcpy(p_, v.data(), sizeof(T) * n_, cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  std::vector<T> download() const {
    std::vector<T> v(n_);
    if (n_ > 0) {
      EXPECT_EQ(cudaMemcpy(v.data(), p_, sizeof(T) * n_, cudaMemcpyDeviceToHost), cudaSuccess);
    }
    return v;
  }
  void fill_bytes(int byte) {
    if (n_ > 0) {
      EXPECT_EQ(cudaMemset(p_, byte, sizeof(T) * n_), cudaSuccess);
    }
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  size_t n_;
  T* p_ = nullptr;
};

inline std::vector<float> normal_vector(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// max_i |got - want| / (abs_floor + |want|) <= tol, with the worst element in the message. abs_floor sets
// where the comparison turns from relative to absolute (values near 0 after cancellation).
inline void expect_close(const std::vector<float>& got, const std::vector<float>& want, float tol,
                         float abs_floor = 1.0f, const std::string& what = "") {
  ASSERT_EQ(got.size(), want.size()) << what;
  float worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float d = std::fabs(got[i] - want[i]) / (abs_floor + std::fabs(want[i]));
    if (!(d <= worst)) worst = d, at = i;  // NaN counts as worst
  }
  EXPECT_LE(worst, tol) << what << ": largest difference at " << at << ": " << got[at] << " vs " << want[at];
}

// The root mean square of v (a scale for absolute tolerances).
inline float rms(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return v.empty() ? 0.0f : static_cast<float>(std::sqrt(s / double(v.size())));
}

}  // namespace cudatest
