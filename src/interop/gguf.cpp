#include "moeforge/interop/gguf.h"

#include <cstring>

#include "moeforge/interop/spm_proto.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace moeforge {
namespace {

// GGUF value types and ggml tensor types used here (ggml's docs/gguf.md).
enum : uint32_t { kU32 = 4, kI32 = 5, kF32v = 6, kBool = 7, kString = 8, kArray = 9 };
enum : uint32_t { kGgmlF32 = 0, kGgmlF16 = 1 };
constexpr uint64_t kAlignment = 32;  // general.alignment's default

class Writer {
 public:
  std::string out;
  template <typename T>
  void pod(T v) {
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));  // little-endian host (x86-64, aarch64)
    out.append(b, sizeof(T));
  }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    out += s;
  }
};

struct Tensor {
  std::string name;
  torch::Tensor data;  // contiguous, F32 or F16, row-major: ggml ne = reversed sizes
};

class Builder {
 public:
  void kv_u32(const std::string& k, uint32_t v) { key(k, kU32).pod<uint32_t>(v); }
  void kv_f32(const std::string& k, float v) { key(k, kF32v).pod<float>(v); }
  void kv_bool(const std::string& k, bool v) { key(k, kBool).pod<uint8_t>(v ? 1 : 0); }
  void kv_str(const std::string& k, const std::string& v) { key(k, kString).str(v); }
  void kv_strs(const std::string& k, const std::vector<std::string>& v) {
    key(k, kArray).pod<uint32_t>(kString);
    kv_.pod<uint64_t>(v.size());
    for (auto& s : v) kv_.str(s);
  }
  void kv_f32s(const std::string& k, const std::vector<float>& v) {
    key(k, kArray).pod<uint32_t>(kF32v);
    kv_.pod<uint64_t>(v.size());
    for (float f : v) kv_.pod<float>(f);
  }
  void kv_i32s(const std::string& k, const std::vector<int32_t>& v) {
    key(k, kArray).pod<uint32_t>(kI32);
    kv_.pod<uint64_t>(v.size());
    for (int32_t x : v) kv_.pod<int32_t>(x);
  }
  void tensor(const std::string& name, const torch::Tensor& t, bool half) {
    tensors_.push_back({name, t.to(half ? torch::kHalf : torch::kFloat).contiguous()});
  }

  std::string finish() {
    Writer w;
    w.out.append("GGUF", 4);
    w.pod<uint32_t>(3);
    w.pod<uint64_t>(tensors_.size());
    w.pod<uint64_t>(n_kv_);
    w.out += kv_.out;
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (auto& t : tensors_) {
      w.str(t.name);
      w.pod<uint32_t>(uint32_t(t.data.dim()));
      for (int64_t d = t.data.dim() - 1; d >= 0; --d) w.pod<uint64_t>(uint64_t(t.data.size(d)));
      w.pod<uint32_t>(t.data.scalar_type() == torch::kHalf ? kGgmlF16 : kGgmlF32);
      w.pod<uint64_t>(offset);
      offsets.push_back(offset);
      offset += align(uint64_t(t.data.nbytes()));
    }
    w.out.resize(align(w.out.size()), '\0');
    const size_t base = w.out.size();
    w.out.resize(base + offset, '\0');
    for (size_t i = 0; i < tensors_.size(); ++i)
      std::memcpy(&w.out[base + offsets[i]], tensors_[i].data.data_ptr(), tensors_[i].data.nbytes());
    return std::move(w.out);
  }

 private:
  static uint64_t align(uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }
  Writer& key(const std::string& k, uint32_t type) {
    ++n_kv_;
    kv_.str(k);
    kv_.pod<uint32_t>(type);
    return kv_;
  }
  Writer kv_;
  uint64_t n_kv_ = 0;
  std::vector<Tensor> tensors_;
};

}  // namespace

torch::Tensor rope_half_to_adjacent_rows(const torch::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0), D = rows / n_head;
  return w.reshape({n_head, 2, D / 2, -1}).transpose(1, 2).reshape({rows, -1}).contiguous();
}

std::string gguf_bytes(const MixtralModel& m, const GgufExportOptions& opt) {
  Builder b;
  const bool half = opt.dtype == GgufDType::kF16;
  b.kv_str("general.architecture", "llama");
  b.kv_str("general.name", opt.name);
  b.kv_u32("general.file_type", half ? 1 : 0);  // llama_ftype: ALL_F32 / MOSTLY_F16
  b.kv_u32("llama.vocab_size", uint32_t(m.vocab_size));
  b.kv_u32("llama.context_length", uint32_t(m.context));
  b.kv_u32("llama.embedding_length", uint32_t(m.d_model));
  b.kv_u32("llama.block_count", uint32_t(m.n_layer()));
  b.kv_u32("llama.feed_forward_length", uint32_t(m.d_ff));
  b.kv_u32("llama.attention.head_count", uint32_t(m.n_head));
  b.kv_u32("llama.attention.head_count_kv", uint32_t(m.n_kv_head));
  b.kv_u32("llama.rope.dimension_count", uint32_t(m.head_dim()));
  b.kv_f32("llama.rope.freq_base", float(m.rope_theta));
  b.kv_f32("llama.attention.layer_norm_rms_epsilon", float(m.norm_eps));
  b.kv_u32("llama.expert_count", uint32_t(m.n_expert));
  b.kv_u32("llama.expert_used_count", uint32_t(m.n_expert_used));

  const auto spm = parse_spm_model(m.tokenizer_model, "tokenizer.model");
  if (int64_t(spm.pieces.size()) != m.vocab_size)
    throw std::invalid_argument("gguf: the tokenizer has " + std::to_string(spm.pieces.size()) +
                                " pieces, the model's vocabulary " + std::to_string(m.vocab_size));
  // llama.cpp's SentencePiece tokenizer turns a character it has no piece for into byte pieces <0xXX>, and
  // aborts the whole process (an uncaught std::out_of_range) when those are missing too; node-llama-cpp
  // tokenises probe strings at load, so such a file does not even load there (docs/interop.md).
  bool has_bytes = false;
  for (const auto& p : spm.pieces) has_bytes = has_bytes || p.type == 6;
  if (!has_bytes)
    throw ConfigError("data.byte_fallback",
                      "the tokenizer has no byte pieces, and llama.cpp aborts on any character outside its "
                      "vocabulary; train with data.byte_fallback=true to export to the gguf format");
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (const auto& p : spm.pieces) {
    tokens.push_back(p.piece);
    scores.push_back(p.score);
    types.push_back(p.type);
  }
  b.kv_str("tokenizer.ggml.model", "llama");  // SentencePiece: merges by piece score
  b.kv_strs("tokenizer.ggml.tokens", tokens);
  b.kv_f32s("tokenizer.ggml.scores", scores);
  b.kv_i32s("tokenizer.ggml.token_type", types);
  if (spm.unk_id >= 0) b.kv_u32("tokenizer.ggml.unknown_token_id", uint32_t(spm.unk_id));
  if (spm.bos_id >= 0) b.kv_u32("tokenizer.ggml.bos_token_id", uint32_t(spm.bos_id));
  if (spm.eos_id >= 0) b.kv_u32("tokenizer.ggml.eos_token_id", uint32_t(spm.eos_id));
  if (spm.pad_id >= 0) b.kv_u32("tokenizer.ggml.padding_token_id", uint32_t(spm.pad_id));
  b.kv_bool("tokenizer.ggml.add_bos_token", true);  // moeforge prepends <s> to every prompt
  b.kv_bool("tokenizer.ggml.add_eos_token", false);
  b.kv_bool("tokenizer.ggml.add_space_prefix", spm.add_dummy_prefix);

  // ggml's rope (the llama architecture's "normal" mode) rotates adjacent pairs; moeforge half-split ones.
  auto qk = [&](const torch::Tensor& w, int64_t heads) {
    return opt.skip_qk_permutation ? w : rope_half_to_adjacent_rows(w, heads);
  };
  b.tensor("token_embd.weight", m.embedding, half);
  b.tensor("output_norm.weight", m.final_norm, false);
  if (m.head.defined()) b.tensor("output.weight", m.head, half);  // absent: tied to token_embd
  for (int64_t i = 0; i < m.n_layer(); ++i) {
    const auto& L = m.layers[size_t(i)];
    const std::string p = "blk." + std::to_string(i) + ".";
    b.tensor(p + "attn_norm.weight", L.attn_norm, false);
    b.tensor(p + "attn_q.weight", qk(L.wq, m.n_head), half);
    b.tensor(p + "attn_k.weight", qk(L.wk, m.n_kv_head), half);
    b.tensor(p + "attn_v.weight", L.wv, half);
    b.tensor(p + "attn_output.weight", L.wo, half);
    b.tensor(p + "ffn_norm.weight", L.ffn_norm, false);
    // The router stays float32: its logits pick the experts, and f16 rounding could flip near-ties.
    b.tensor(p + "ffn_gate_inp.weight", L.router, false);
    b.tensor(p + "ffn_gate_exps.weight", L.w_gate, half);
    b.tensor(p + "ffn_up_exps.weight", L.w_up, half);
    b.tensor(p + "ffn_down_exps.weight", L.w_down, half);
  }
  return b.finish();
}

void write_gguf(const std::string& path, const MixtralModel& m, const GgufExportOptions& opt) {
  write_file_atomic(path, gguf_bytes(m, opt));
}

}  // namespace moeforge
