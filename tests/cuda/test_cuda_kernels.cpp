// The CUDA kernels (kernels/cuda) against plain CPU loops. Skipped when no CUDA device is present (CI,
// the CPU build machine). No LibTorch: raw device buffers, as the kernels take them.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/cuda/moe_ops.h"

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
