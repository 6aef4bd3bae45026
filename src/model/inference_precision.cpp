// Inference with bf16-stored weights (inference_precision.h).
#include "moeforge/model/inference_precision.h"

#include "moeforge/util/error.h"

namespace moeforge {

MatmulPrecision inference_precision(const std::string& dtype, const std::string& checkpoint_precision,
                                    const CpuFeatures& cpu, const std::string& flag, std::string* what_runs) {
  if (dtype != "fp32" && dtype != "bf16" && dtype != "auto")
    throw ConfigError(
        flag,
        "must be \"fp32\", \"bf16\" or \"auto\" (the checkpoint's train.precision), got \"" + dtype + "\"");
  const std::string name = dtype == "auto" ? checkpoint_precision : dtype;
  const auto p = parse_matmul_precision(name);
  if (p == MatmulPrecision::kFloat32) {
    if (what_runs) *what_runs = "weights: fp32";
    return p;
  }
  const std::string native = bf16_support(cpu);
  if (native.empty())
    throw ConfigError(flag,
                      "bf16 needs a CPU with native bf16 products (AVX512-BF16 or AMX-BF16); this one has "
                      "neither (see `moeforge info`), so every product of more than a few rows would be "
                      "converted to float32 and run slower than fp32. Use " +
                          flag + " fp32");
  if (what_runs)
    *what_runs = "weights: bf16 (products on " + native +
                 "; routers, norms, biases and activations float32; docs/performance.md, \"bf16 inference\")";
  return p;
}

namespace {
void store(torch::Tensor& w, StoredWeights& s) {
  if (!w.defined()) return;
  torch::NoGradGuard ng;
  w.set_data(w.detach().to(torch::kBFloat16).contiguous());
  s.bf16_params += w.numel();
}

void store(DenseFFNImpl& f, StoredWeights& s) {
  store(f.w_gate, s);
  store(f.w_up, s);
  store(f.w_down, s);
}
}  // namespace

StoredWeights store_weights_bf16(TransformerLMImpl& model) {
  StoredWeights s;
  store(model.embedding, s);
  store(model.head, s);
  for (const auto& b : *model.blocks) {
    auto* blk = b->as<BlockImpl>();
    store(blk->attn->w_qkv, s);
    store(blk->attn->w_out, s);
    if (blk->ffn) store(*blk->ffn, s);
    if (!blk->moe) continue;
    auto& moe = *blk->moe;
    if (moe.experts) {
      store(moe.experts->w_gate, s);
      store(moe.experts->w_up, s);
      store(moe.experts->w_down, s);
    }
    if (moe.dense) store(*moe.dense, s);
    if (moe.shared) store(*moe.shared, s);
  }
  for (auto& p : model.parameters()) {
    p.set_requires_grad(false);
    if (p.scalar_type() != torch::kBFloat16) s.fp32_params += p.numel();
  }
  return s;
}

}  // namespace moeforge
