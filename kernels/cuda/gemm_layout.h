// Host-only (no CUDA include): how the row-major products of the MoE layer become cuBLAS's column-major
// calls, and the per-expert problems of the grouped GEMMs. Kept apart from grouped_gemm.cu so that the
// mapping is tested on machines without a GPU (tests/cuda/test_cuda_moe.cpp, GemmLayout.*).
//
// The mapping: a row-major matrix X [r, c] (leading dimension c) is, read in column-major order, X^T [c, r]
// with the same leading dimension. So the row-major product C [M, N] = op(A) [M, K] @ op(B) [K, N] is the
// column-major product C^T [N, M] = op(B)^T [N, K] @ op(A)^T [K, M]: cuBLAS gets B first and A second,
// m = N, n = M, k = K, each operand transposed exactly when it was in the row-major product, leading
// dimensions the stored row lengths (B: trans_b ? K : N, A: trans_a ? M : K) and ldc = N.
#pragma once

#include <cstdint>
#include <vector>

namespace moeforge::kernels::cuda {

// One column-major GEMM as cuBLAS takes it: C = op(first) @ op(second) (+ beta C), C [m, n].
struct ColMajorGemm {
  bool trans_first = false, trans_second = false;  // cuBLAS transa / transb
  int64_t m = 0, n = 0, k = 0;
  const void* first = nullptr;  // cuBLAS A
  int64_t ld_first = 0;
  const void* second = nullptr;  // cuBLAS B
  int64_t ld_second = 0;
  void* c = nullptr;
  int64_t ldc = 0;
};

// Row-major C [M, N] = op(A) [M, K] @ op(B) [K, N]; op transposes when the flag is set, A stored [M, K]
// (or [K, M] when trans_a), B stored [K, N] (or [N, K] when trans_b), all dense.
inline ColMajorGemm col_major_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const void* A,
                                   const void* B, void* C) {
  ColMajorGemm g;
  g.trans_first = trans_b;
  g.trans_second = trans_a;
  g.m = N;
  g.n = M;
  g.k = K;
  g.first = B;
  g.ld_first = trans_b ? K : N;
  g.second = A;
  g.ld_second = trans_a ? M : K;
  g.c = C;
  g.ldc = N;
  return g;
}

// The grouped products, W [E, O, I] in nn.Linear's layout and rows of expert e at off[e] .. off[e + 1]:
//   kNT:         out [N, O], out[rows e] = a[rows e] [n, I] @ W[e]^T              (forward; b = W)
//   kNN:         out [N, I], out[rows e] = a[rows e] [n, O] @ W[e]                (data gradient; b = W)
//   kWeightGrad: out [E, O, I], out[e] = a[rows e]^T [O, n] @ b[rows e] [n, I]    (a = d [N, O], b = in [N,
//   I])
enum class GroupedKind { kNT, kNN, kWeightGrad };

struct ExpertGemm {
  int64_t expert;
  ColMajorGemm gemm;
};

// One problem per expert with rows (experts without rows produce nothing: the caller zeroes their weight
// gradient when it does not accumulate). elt_in: bytes per element of a and b; elt_out: of out.
inline std::vector<ExpertGemm> grouped_problems(GroupedKind kind, void* out, const void* a, const void* b,
                                                const int64_t* off, int64_t E, int64_t O, int64_t I,
                                                int64_t elt_in, int64_t elt_out) {
  std::vector<ExpertGemm> v;
  auto* po = static_cast<char*>(out);
  const auto* pa = static_cast<const char*>(a);
  const auto* pb = static_cast<const char*>(b);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    if (n <= 0) continue;
    switch (kind) {
      case GroupedKind::kNT:
        v.push_back({e, col_major_gemm(false, true, n, O, I, pa + r0 * I * elt_in, pb + e * O * I * elt_in,
                                       po + r0 * O * elt_out)});
        break;
      case GroupedKind::kNN:
        v.push_back({e, col_major_gemm(false, false, n, I, O, pa + r0 * O * elt_in, pb + e * O * I * elt_in,
                                       po + r0 * I * elt_out)});
        break;
      case GroupedKind::kWeightGrad:
        v.push_back({e, col_major_gemm(true, false, O, I, n, pa + r0 * O * elt_in, pb + r0 * I * elt_in,
                                       po + e * O * I * elt_out)});
        break;
    }
  }
  return v;
}

// Whether cublasGemmGroupedBatchedEx may take these problems: it runs one kernel choice over all of them
// and, for 16-bit types, expects aligned pointers (the cuBLAS guide asks for 16-byte alignment), so every
// pointer must be 16-byte aligned and every leading dimension a multiple of 16 bytes; and its sizes are
// int. Otherwise the caller loops over cublasGemmEx, which checks alignment per call.
inline bool grouped_call_fits(const std::vector<ExpertGemm>& v, int64_t elt_in, int64_t elt_out) {
  constexpr int64_t kIntMax = 2147483647;
  for (const auto& p : v) {
    const ColMajorGemm& g = p.gemm;
    if (reinterpret_cast<uintptr_t>(g.first) % 16 || reinterpret_cast<uintptr_t>(g.second) % 16 ||
        reinterpret_cast<uintptr_t>(g.c) % 16)
      return false;
    if ((g.ld_first * elt_in) % 16 || (g.ld_second * elt_in) % 16 || (g.ldc * elt_out) % 16) return false;
    for (int64_t x : {g.m, g.n, g.k, g.ld_first, g.ld_second, g.ldc})
      if (x > kIntMax) return false;
  }
  return true;
}

}  // namespace moeforge::kernels::cuda
