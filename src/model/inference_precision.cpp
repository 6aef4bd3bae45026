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
  std::string native;
  const auto p = precision_on_this_cpu(dtype == "auto" ? checkpoint_precision : dtype, cpu, flag,
                                       flag + " fp32", &native);
  if (what_runs)
    *what_runs = p == MatmulPrecision::kFloat32
                     ? "weights: fp32"
                     : "weights: bf16 (products on " + native +
                           "; routers, norms, biases and activations float32; docs/performance.md, \"bf16 "
                           "inference\")";
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
