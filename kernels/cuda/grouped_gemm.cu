#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <vector>

#include "kernels/cuda/gemm_layout.h"
#include "kernels/cuda/grouped_gemm.h"

namespace moeforge::kernels::cuda {
namespace {

constexpr int64_t kIntMax = 2147483647;

int cublas_rc(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? 0 : kCublasErrorBase + static_cast<int>(s);
}

cudaDataType_t cuda_type(DType t) {
  return t == DType::kFloat32 ? CUDA_R_32F : CUDA_R_16BF;
}

cublasOperation_t op(bool trans) {
  return trans ? CUBLAS_OP_T : CUBLAS_OP_N;
}

int prepare(cublasHandle_t h, void* stream) {
  if (h == nullptr) return kCublasErrorBase + static_cast<int>(CUBLAS_STATUS_NOT_INITIALIZED);
  if (const int rc = cublas_rc(cublasSetStream(h, static_cast<cudaStream_t>(stream)))) return rc;
  return cublas_rc(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
}

int run_one(cublasHandle_t h, const ColMajorGemm& g, DType ab, DType c, float beta) {
  for (int64_t x : {g.m, g.n, g.k, g.ld_first, g.ld_second, g.ldc})
    if (x > kIntMax) return static_cast<int>(cudaErrorInvalidValue);
  const float alpha = 1.0f;
  return cublas_rc(cublasGemmEx(h, op(g.trans_first), op(g.trans_second), static_cast<int>(g.m),
                                static_cast<int>(g.n), static_cast<int>(g.k), &alpha, g.first, cuda_type(ab),
                                static_cast<int>(g.ld_first), g.second, cuda_type(ab),
                                static_cast<int>(g.ld_second), &beta, g.c, cuda_type(c),
                                static_cast<int>(g.ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

#if CUBLAS_VERSION >= 120500
constexpr bool kNativeGrouped = true;

// One group per expert (their row counts differ), group_size 1. The pointer arrays must be in device memory:
// A at ptrs[0, G), B at [G, 2G), C at [2G, 3G).
int run_grouped(cublasHandle_t h, const std::vector<ExpertGemm>& v, DType dt, float beta, void* ptr_scratch,
                void* stream) {
  const size_t G = v.size();
  std::vector<cublasOperation_t> ta(G), tb(G);
  std::vector<int> m(G), n(G), k(G), lda(G), ldb(G), ldc(G), group_size(G, 1);
  std::vector<float> alphas(G, 1.0f), betas(G, beta);
  std::vector<const void*> ptrs(3 * G);
  for (size_t i = 0; i < G; ++i) {
    const ColMajorGemm& g = v[i].gemm;
    ta[i] = op(g.trans_first);
    tb[i] = op(g.trans_second);
    m[i] = static_cast<int>(g.m);
    n[i] = static_cast<int>(g.n);
    k[i] = static_cast<int>(g.k);
    lda[i] = static_cast<int>(g.ld_first);
    ldb[i] = static_cast<int>(g.ld_second);
    ldc[i] = static_cast<int>(g.ldc);
    ptrs[i] = g.first;
    ptrs[G + i] = g.second;
    ptrs[2 * G + i] = g.c;
  }
  // From pageable memory: the copy is staged before cudaMemcpyAsync returns, so `ptrs` may go; stream
  // order keeps a later call from overwriting the arrays before this GEMM has read them.
  if (const cudaError_t rc = cudaMemcpyAsync(ptr_scratch, ptrs.data(), sizeof(void*) * 3 * G,
                                             cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)))
    return static_cast<int>(rc);
  void** dp = static_cast<void**>(ptr_scratch);
  const cudaDataType_t t = cuda_type(dt);
  return cublas_rc(cublasGemmGroupedBatchedEx(h, ta.data(), tb.data(), m.data(), n.data(), k.data(),
                                              alphas.data(), const_cast<const void* const*>(dp), t,
                                              lda.data(), const_cast<const void* const*>(dp + G), t,
                                              ldb.data(), betas.data(), dp + 2 * G, t, ldc.data(),
                                              static_cast<int>(G), group_size.data(), CUBLAS_COMPUTE_32F));
}
#else
constexpr bool kNativeGrouped = false;
int run_grouped(cublasHandle_t, const std::vector<ExpertGemm>&, DType, float, void*, void*) {
  return static_cast<int>(cudaErrorNotSupported);
}
#endif

int grouped(void* cublas, GroupedKind kind, DType in_dt, DType out_dt, void* out, const void* a,
            const void* b, const int64_t* offsets, int64_t E, int64_t O, int64_t I, bool accumulate,
            void* ptr_scratch, void* stream) {
  if (E < 0 || O < 0 || I < 0 || (E > 0 && offsets == nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  auto h = static_cast<cublasHandle_t>(cublas);
  if (const int rc = prepare(h, stream)) return rc;
  if (E == 0 || O == 0 || I == 0) return 0;
  const int64_t ei = dtype_size(in_dt), eo = dtype_size(out_dt);
  if (kind == GroupedKind::kWeightGrad && !accumulate) {
    for (int64_t e = 0; e < E; ++e) {
      if (offsets[e + 1] > offsets[e]) continue;
      if (const cudaError_t rc =
              cudaMemsetAsync(static_cast<char*>(out) + e * O * I * eo, 0, static_cast<size_t>(O * I * eo),
                              static_cast<cudaStream_t>(stream)))
        return static_cast<int>(rc);
    }
  }
  const std::vector<ExpertGemm> problems = grouped_problems(kind, out, a, b, offsets, E, O, I, ei, eo);
  if (problems.empty()) return 0;
  const float beta = accumulate ? 1.0f : 0.0f;
  if (kNativeGrouped && ptr_scratch != nullptr && in_dt == out_dt && grouped_call_fits(problems, ei, eo)) {
    const int rc = run_grouped(h, problems, in_dt, beta, ptr_scratch, stream);
    // A cuBLAS that declines this type combination for the grouped call still has the loop.
    if (rc != kCublasErrorBase + static_cast<int>(CUBLAS_STATUS_NOT_SUPPORTED)) return rc;
  }
  for (const ExpertGemm& p : problems)
    if (const int rc = run_one(h, p.gemm, in_dt, out_dt, beta)) return rc;
  return 0;
}

}  // namespace

bool grouped_gemm_native() {
  return kNativeGrouped;
}

size_t grouped_gemm_scratch_bytes(int64_t n_expert) {
  return static_cast<size_t>(3 * (n_expert > 0 ? n_expert : 0)) * sizeof(void*);
}

int gemm(void* cublas, DType ab, DType c, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
         const void* A, const void* B, void* C, bool accumulate, void* stream) {
  if (M < 0 || N < 0 || K < 0) return static_cast<int>(cudaErrorInvalidValue);
  auto h = static_cast<cublasHandle_t>(cublas);
  if (const int rc = prepare(h, stream)) return rc;
  if (M == 0 || N == 0) return 0;
  if (K == 0) {  // an empty sum: C = 0, or unchanged when accumulating
    if (accumulate) return 0;
    return static_cast<int>(
        cudaMemsetAsync(C, 0, static_cast<size_t>(M * N * dtype_size(c)), static_cast<cudaStream_t>(stream)));
  }
  return run_one(h, col_major_gemm(trans_a, trans_b, M, N, K, A, B, C), ab, c, accumulate ? 1.0f : 0.0f);
}

int grouped_mm_nt(void* cublas, DType dt, void* out, const void* in, const void* w, const int64_t* offsets,
                  int64_t E, int64_t O, int64_t I, bool accumulate, void* ptr_scratch, void* stream) {
  return grouped(cublas, GroupedKind::kNT, dt, dt, out, in, w, offsets, E, O, I, accumulate, ptr_scratch,
                 stream);
}

int grouped_mm_nn(void* cublas, DType dt, void* out, const void* in, const void* w, const int64_t* offsets,
                  int64_t E, int64_t O, int64_t I, bool accumulate, void* ptr_scratch, void* stream) {
  return grouped(cublas, GroupedKind::kNN, dt, dt, out, in, w, offsets, E, O, I, accumulate, ptr_scratch,
                 stream);
}

int grouped_weight_grad(void* cublas, DType dt, DType dw_dt, void* dw, const void* d, const void* in,
                        const int64_t* offsets, int64_t E, int64_t O, int64_t I, bool accumulate,
                        void* ptr_scratch, void* stream) {
  return grouped(cublas, GroupedKind::kWeightGrad, dt, dw_dt, dw, d, in, offsets, E, O, I, accumulate,
                 ptr_scratch, stream);
}

}  // namespace moeforge::kernels::cuda
