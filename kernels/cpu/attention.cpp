// Compiled with -ffast-math (CMakeLists.txt) so that GCC vectorises exp through glibc's libmvec; exp only
// ever sees scale * (s - max(s)) <= 0 of finite scores (the masked positions are never computed), so the
// finite-math assumption holds. Sums are reassociated: float rounding differs from the plain twin by a few
// ulp, which the tests bound (tests/test_fused_ops.cpp).
//
// Every product is C = A B with B [K, N] row-major and A [M, K] row-major or read transposed in place,
// computed by mm() in register tiles of 4 rows x 16 columns, and restricted to the causal part: query block
// [i0, i0 + 4) needs keys 0 .. i0 + 3 only, key block [j0, j0 + 4) gets queries j0 .. S - 1 only.
#include "attention.h"

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace moeforge::kernels::cpu {
namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
// Unaligned 8-float loads and stores through the may_alias vector type (as kernels/cpu/small_mm.cpp does).
#define MOEFORGE_LOAD8(p) (*reinterpret_cast<const v8*>(p))
#define MOEFORGE_STORE8(p, x) (*reinterpret_cast<v8*>(p) = (x))

// C[r, n] = sum_k A[r, k] B[k, n] for r < M, n < N. TransA: A is stored [K, M] (A[r, k] = a[k * lda + r]),
// else [M, K] (a[r * lda + k]). ldX are row strides.
template <bool TransA>
__attribute__((always_inline)) inline void mm(float* C, int64_t ldc, const float* a, int64_t lda,
                                              const float* B, int64_t ldb, int64_t M, int64_t N, int64_t K) {
  auto A = [&](int64_t r, int64_t k) { return TransA ? a[k * lda + r] : a[r * lda + k]; };
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) {
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      v8 acc[4][2] = {};
      for (int64_t k = 0; k < K; ++k) {
        const v8 b0 = MOEFORGE_LOAD8(B + k * ldb + n), b1 = MOEFORGE_LOAD8(B + k * ldb + n + 8);
        for (int i = 0; i < 4; ++i) {
          const float ar = A(r + i, k);
          acc[i][0] += ar * b0;
          acc[i][1] += ar * b1;
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int u = 0; u < 2; ++u) MOEFORGE_STORE8(C + (r + i) * ldc + n + 8 * u, acc[i][u]);
    }
    for (; n < N; ++n)
      for (int i = 0; i < 4; ++i) {
        float s = 0.0f;
        for (int64_t k = 0; k < K; ++k) s += A(r + i, k) * B[k * ldb + n];
        C[(r + i) * ldc + n] = s;
      }
  }
  for (; r < M; ++r)
    for (int64_t n = 0; n < N; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += A(r, k) * B[k * ldb + n];
      C[r * ldc + n] = s;
    }
}

void transpose(float* dst, const float* src, int64_t rows, int64_t cols) {  // [rows, cols] -> [cols, rows]
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

constexpr int64_t kRows = 4;  // rows per causal block (mm's tile height)

}  // namespace

MOEFORGE_KERNEL_CLONES
void causal_attention_forward(const float* q, const float* k, const float* v, float* p, float* out, float* kt,
                              int64_t S, int64_t D, float scale) {
  transpose(kt, k, S, D);  // [D, S]
  for (int64_t i0 = 0; i0 < S; i0 += kRows) {
    const int64_t rows = std::min(kRows, S - i0), keys = i0 + rows;
    mm<false>(p + i0 * S, S, q + i0 * D, D, kt, S, rows, keys, D);  // scores: q [rows, D] k^T [D, keys]
    for (int64_t i = i0; i < i0 + rows; ++i) {
      float* pr = p + i * S;
      const int64_t n = i + 1;
      float mx = pr[0];
      for (int64_t j = 1; j < n; ++j) mx = std::max(mx, pr[j]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        pr[j] = std::exp(scale * (pr[j] - mx));
        sum += pr[j];
      }
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) pr[j] *= inv;
      std::fill(pr + n, pr + S, 0.0f);
    }
    mm<false>(out + i0 * D, D, p + i0 * S, S, v, D, rows, D, keys);  // p [rows, keys] v [keys, D]
  }
}

MOEFORGE_KERNEL_CLONES
void causal_attention_backward(const float* q, const float* k, const float* v, const float* p,
                               const float* dout, float* dq, float* dk, float* dv, float* scratch, int64_t S,
                               int64_t D, float scale) {
  float* vt = scratch;     // [D, S]
  float* ds = vt + D * S;  // [S, S]
  transpose(vt, v, S, D);
  for (int64_t i0 = 0; i0 < S; i0 += kRows) {
    const int64_t rows = std::min(kRows, S - i0), keys = i0 + rows;
    mm<false>(ds + i0 * S, S, dout + i0 * D, D, vt, S, rows, keys, D);  // dp = dout v^T
    for (int64_t i = i0; i < i0 + rows; ++i) {
      const float* pr = p + i * S;
      float* dr = ds + i * S;
      const int64_t n = i + 1;
      // Softmax backward: ds_ij = p_ij (dp_ij - sum_j p_ij dp_ij), times the score scale.
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < n; ++j) dot += pr[j] * dr[j];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dr[j] = scale * pr[j] * (dr[j] - dot);
      std::fill(dr + n, dr + S, 0.0f);
    }
    mm<false>(dq + i0 * D, D, ds + i0 * S, S, k, D, rows, D, keys);  // dq = ds k
  }
  // dk = ds^T q and dv = p^T dout, ds and p read transposed in place.
  for (int64_t j0 = 0; j0 < S; j0 += kRows) {
    const int64_t rows = std::min(kRows, S - j0);
    mm<true>(dk + j0 * D, D, ds + j0 * S + j0, S, q + j0 * D, D, rows, D, S - j0);
    mm<true>(dv + j0 * D, D, p + j0 * S + j0, S, dout + j0 * D, D, rows, D, S - j0);
  }
}

}  // namespace moeforge::kernels::cpu
