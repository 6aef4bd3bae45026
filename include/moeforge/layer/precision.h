// The precision of the model's matrix products (docs/performance.md, "bf16 training"): float32, or bf16
// operands with float32 accumulation, as PyTorch's autocast does it on the CPU. Master weights, optimiser
// state, router scores, softmax, norms, the loss and every reduction stay float32 either way; only the
// products' operands are rounded to bf16 (and their outputs, which oneDNN rounds to bf16 before they are
// widened back to float32).
//
// The precision in force is per thread and set by a guard around a forward and backward pass (the trainer's
// step, `bench --train`); autograd functions read it in forward and keep it for their backward. Without a
// guard every product is float32.
#pragma once

#include <torch/torch.h>

#include <string>

#include "moeforge/util/runtime.h"

namespace moeforge {

enum class MatmulPrecision { kFloat32, kBFloat16 };

// The precision in force on this thread.
MatmulPrecision matmul_precision();

// Sets the precision for its scope on this thread and restores the previous one at its end.
class MatmulPrecisionGuard {
 public:
  explicit MatmulPrecisionGuard(MatmulPrecision p);
  ~MatmulPrecisionGuard();
  MatmulPrecisionGuard(const MatmulPrecisionGuard&) = delete;
  MatmulPrecisionGuard& operator=(const MatmulPrecisionGuard&) = delete;

 private:
  MatmulPrecision previous_;
};

// "fp32" -> kFloat32, "bf16" -> kBFloat16 (train.precision's values, checked by its validate()).
MatmulPrecision parse_matmul_precision(const std::string& name);

// `name` ("fp32" or "bf16") checked against the CPU that runs it: "bf16" needs native bf16 products
// (AVX512-BF16 or AMX-BF16, bf16_support), elsewhere it is a ConfigError naming `field` that says to use
// `use_instead`, never a silent emulation at a fraction of float32's rate. `native`, for bf16, gets what
// the CPU has ("AVX512-BF16", ...). Training's train.precision and inference's --dtype both check here.
MatmulPrecision precision_on_this_cpu(const std::string& name, const CpuFeatures& cpu,
                                      const std::string& field, const std::string& use_instead,
                                      std::string* native = nullptr);

// y = x @ w^T (+ bias), w [O, I] in nn.Linear's layout, x [..., I] float32: in float32, or with bf16
// operands and the result widened back to x's dtype. Differentiable in x, w and bias: the casts are
// autograd's, so the gradients reach the float32 master weights as float32 (computed from bf16 operands).
// A weight stored in bf16 (inference, model/inference_precision.h) always gives bf16 products for float32
// x, whatever the precision in force: up to 16 rows without gradients in small_mm_nt_bf16 (float32 sums,
// the output not rounded to bf16), more rows in LibTorch's bf16 product.
torch::Tensor linear_mp(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias = {});

}  // namespace moeforge
