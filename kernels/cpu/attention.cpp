// Compiled with -ffast-math (CMakeLists.txt) so that GCC vectorises exp through glibc's libmvec; exp only
// ever sees s - max(s) <= 0 of finite scores (the masked positions are never computed), so the
// finite-math assumption holds. The sums over j are reassociated by the vectoriser: float rounding differs
// from the plain twin by a few ulp, which the tests bound (tests/test_attention.cpp).
#include "attention.h"

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace moeforge::kernels::cpu {

MOEFORGE_KERNEL_CLONES
void causal_attention_forward(const float* q, const float* k, const float* v, float* p, float* out, float* kt,
                              int64_t S, int64_t D, float scale) {
  for (int64_t j = 0; j < S; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * S + j] = k[j * D + d];
  for (int64_t i = 0; i < S; ++i) {
    float* pr = p + i * S;
    const int64_t n = i + 1;
    // Scores of row i, vectorised over the keys: s_j = sum_d (scale q_id) k_jd.
    std::fill(pr, pr + S, 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const float qd = scale * q[i * D + d];
      const float* kr = kt + d * S;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) pr[j] += qd * kr[j];
    }
    float mx = pr[0];
    for (int64_t j = 1; j < n; ++j) mx = std::max(mx, pr[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      pr[j] = std::exp(pr[j] - mx);
      sum += pr[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) pr[j] *= inv;
    // out_i = sum_j p_ij v_j, vectorised over the head width.
    float* o = out + i * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float pj = pr[j];
      const float* vr = v + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += pj * vr[d];
    }
  }
}

MOEFORGE_KERNEL_CLONES
void causal_attention_backward(const float* q, const float* k, const float* v, const float* p,
                               const float* dout, float* dq, float* dk, float* dv, float* vt, float* row,
                               int64_t S, int64_t D, float scale) {
  for (int64_t j = 0; j < S; ++j)
    for (int64_t d = 0; d < D; ++d) vt[d * S + j] = v[j * D + d];
  std::fill(dk, dk + S * D, 0.0f);
  std::fill(dv, dv + S * D, 0.0f);
  for (int64_t i = 0; i < S; ++i) {
    const float* pr = p + i * S;
    const float* go = dout + i * D;
    const int64_t n = i + 1;
    // dv_j += p_ij dout_i
    for (int64_t j = 0; j < n; ++j) {
      const float pj = pr[j];
      float* dvr = dv + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dvr[d] += pj * go[d];
    }
    // dp_ij = dout_i . v_j, vectorised over j
    std::fill(row, row + n, 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const float g = go[d];
      const float* vr = vt + d * S;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] += g * vr[j];
    }
    // Softmax backward: ds_ij = p_ij (dp_ij - sum_j p_ij dp_ij), times the score scale.
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) dot += pr[j] * row[j];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = scale * pr[j] * (row[j] - dot);
    // dq_i = sum_j ds_ij k_j; dk_j += ds_ij q_i
    float* dqi = dq + i * D;
    const float* qi = q + i * D;
    std::fill(dqi, dqi + D, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float s = row[j];
      const float* kr = k + j * D;
      float* dkr = dk + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        dqi[d] += s * kr[d];
        dkr[d] += s * qi[d];
      }
    }
  }
}

}  // namespace moeforge::kernels::cpu
