// Inference with bf16-stored weights (docs/performance.md, "bf16 inference"): `generate`, `eval` and
// `serve` with `--dtype bf16` keep the model's matrix weights (embedding, output head, attention
// projections, dense FFNs, routed and shared experts) in bf16, so a decode step reads half the bytes; the
// routers, norms, biases and the shared-expert gate stay float32, as do the activations between the
// products, the attention core, the softmax and every sum. A product of a bf16-stored weight rounds its
// float32 input to bf16 and accumulates in float32 (layer/precision.h, linear_mp; the experts' fused path).
//
// Checkpoints always hold float32 master weights: a model whose weights were stored in bf16 is for
// inference only (its parameters no longer ask for gradients, and save_checkpoint refuses its weights).
#pragma once

#include <string>

#include "moeforge/layer/precision.h"
#include "moeforge/model/transformer.h"
#include "moeforge/util/runtime.h"

namespace moeforge {

// The precision `--dtype` asks for: "fp32", "bf16", or "auto" (the checkpoint's train.precision, the
// precision it was trained in). bf16 needs native bf16 products (AVX512-BF16 or AMX-BF16): without them
// LibTorch converts every product of more than a few rows to float32 and prefill and evaluation would run
// slower than fp32, so it is a ConfigError naming `flag`. `what_runs`, when given, gets a line saying which.
MatmulPrecision inference_precision(const std::string& dtype, const std::string& checkpoint_precision,
                                    const CpuFeatures& cpu, const std::string& flag,
                                    std::string* what_runs = nullptr);

// What store_weights_bf16 did: the matrix weights it stored in bf16 and the parameters left in float32.
struct StoredWeights {
  int64_t bf16_params = 0, fp32_params = 0;
  int64_t bytes() const { return 2 * bf16_params + 4 * fp32_params; }
};

// Stores the model's matrix weights in bf16 (rounded to nearest even) and stops every parameter asking
// for gradients. Adapter experts stay float32 (their products run in float32).
StoredWeights store_weights_bf16(TransformerLMImpl& model);

}  // namespace moeforge
