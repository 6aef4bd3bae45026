#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/cuda/types.h"

namespace moeforge::kernels::cuda {

const char* error_string(int code) {
  if (code == 0) return "success";
  if (code >= kCublasErrorBase)
    return cublasGetStatusString(static_cast<cublasStatus_t>(code - kCublasErrorBase));
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace moeforge::kernels::cuda
