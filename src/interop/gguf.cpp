#include "moeforge/interop/gguf.h"

#include <cmath>
#include <cstring>

#include "moeforge/interop/spm_proto.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace moeforge {
namespace {

// GGUF value types and ggml tensor types used here (ggml's docs/gguf.md).
enum : uint32_t { kU32 = 4, kI32 = 5, kF32v = 6, kBool = 7, kString = 8, kArray = 9 };
enum : uint32_t { kGgmlF32 = 0, kGgmlF16 = 1, kGgmlQ8_0 = 8, kGgmlBF16 = 30 };
constexpr int64_t kQ8Block = 32;  // weights per Q8_0 block: an f16 scale and 32 int8
constexpr int64_t kQ8BlockBytes = 2 + kQ8Block;
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
  std::vector<uint64_t> ne;  // ggml order: ne[0] the fastest dimension (row-major sizes reversed)
  uint32_t type;
  std::string bytes;
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
  // `type` for 2-D and 3-D weights; a Q8_0 tensor whose rows are not whole blocks is written F16 (noted).
  void tensor(const std::string& name, const torch::Tensor& t, GgufDType type,
              std::vector<std::string>* notes = nullptr) {
    Tensor out{name, {}, kGgmlF32, {}};
    for (int64_t d = t.dim() - 1; d >= 0; --d) out.ne.push_back(uint64_t(t.size(d)));
    if (type == GgufDType::kQ8_0 && t.size(-1) % kQ8Block != 0) {
      if (notes)
        notes->push_back(name + " kept f16: its rows (" + std::to_string(t.size(-1)) +
                         ") are not whole q8_0 blocks of 32");
      type = GgufDType::kF16;
    }
    if (type == GgufDType::kQ8_0) {
      out.type = kGgmlQ8_0;
      out.bytes = quantize_q8_0(t);
    } else {
      const auto st = type == GgufDType::kF16    ? torch::kHalf
                      : type == GgufDType::kBF16 ? torch::kBFloat16
                                                 : torch::kFloat;
      const auto c = t.to(st).contiguous();
      out.type = type == GgufDType::kF16 ? kGgmlF16 : type == GgufDType::kBF16 ? kGgmlBF16 : kGgmlF32;
      out.bytes.assign(static_cast<const char*>(c.data_ptr()), c.nbytes());
    }
    tensors_.push_back(std::move(out));
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
      w.pod<uint32_t>(uint32_t(t.ne.size()));
      for (uint64_t n : t.ne) w.pod<uint64_t>(n);
      w.pod<uint32_t>(t.type);
      w.pod<uint64_t>(offset);
      offsets.push_back(offset);
      offset += align(uint64_t(t.bytes.size()));
    }
    w.out.resize(align(w.out.size()), '\0');
    const size_t base = w.out.size();
    w.out.resize(base + offset, '\0');
    for (size_t i = 0; i < tensors_.size(); ++i)
      std::memcpy(&w.out[base + offsets[i]], tensors_[i].bytes.data(), tensors_[i].bytes.size());
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

std::string quantize_q8_0(const torch::Tensor& t) {
  const auto x = t.detach().to(torch::kFloat).contiguous();
  if (x.dim() == 0 || x.size(-1) % kQ8Block != 0)
    throw std::invalid_argument("q8_0: rows of " + std::to_string(x.dim() ? x.size(-1) : 0) +
                                " are not whole blocks of 32");
  const int64_t nb = x.numel() / kQ8Block;
  // The scales, rounded to f16 as llama.cpp stores them (the quantised values use the unrounded 1/d, as
  // ggml's reference quantiser does).
  const auto xb = x.reshape({nb, kQ8Block});
  const auto amax = xb.abs().amax(1);
  const auto d = (amax / 127.0f).contiguous();
  const auto d16 = d.to(torch::kHalf).contiguous();
  std::string out(size_t(nb * kQ8BlockBytes), '\0');
  const float* px = x.data_ptr<float>();
  const float* pd = d.data_ptr<float>();
  const auto* ph = reinterpret_cast<const char*>(d16.data_ptr());
  for (int64_t b = 0; b < nb; ++b) {
    char* blk = &out[size_t(b * kQ8BlockBytes)];
    std::memcpy(blk, ph + 2 * b, 2);
    const float id = pd[b] != 0.0f ? 1.0f / pd[b] : 0.0f;
    for (int64_t j = 0; j < kQ8Block; ++j)
      blk[2 + j] = static_cast<char>(static_cast<int8_t>(std::round(px[b * kQ8Block + j] * id)));
  }
  return out;
}

torch::Tensor dequantize_q8_0(const std::string& blocks, std::vector<int64_t> sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  if (n % kQ8Block != 0 || int64_t(blocks.size()) != n / kQ8Block * kQ8BlockBytes)
    throw std::invalid_argument("q8_0: " + std::to_string(blocks.size()) + " bytes do not hold " +
                                std::to_string(n) + " weights");
  const int64_t nb = n / kQ8Block;
  auto d16 = torch::empty({nb}, torch::kHalf);
  auto q = torch::empty({nb, kQ8Block}, torch::kChar);
  auto* pd = reinterpret_cast<char*>(d16.data_ptr());
  auto* pq = q.data_ptr<int8_t>();
  for (int64_t b = 0; b < nb; ++b) {
    std::memcpy(pd + 2 * b, &blocks[size_t(b * kQ8BlockBytes)], 2);
    std::memcpy(pq + b * kQ8Block, &blocks[size_t(b * kQ8BlockBytes + 2)], kQ8Block);
  }
  return (q.to(torch::kFloat) * d16.to(torch::kFloat).unsqueeze(1)).reshape(sizes);
}

torch::Tensor rope_half_to_adjacent_rows(const torch::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0), D = rows / n_head;
  return w.reshape({n_head, 2, D / 2, -1}).transpose(1, 2).reshape({rows, -1}).contiguous();
}

std::string gguf_bytes(const MixtralModel& m, const GgufExportOptions& opt) {
  Builder b;
  const GgufDType wt = opt.dtype;  // 2-D and 3-D weights
  const GgufDType f32 = GgufDType::kF32;
  const bool deepseek = m.form == "deepseek";
  const std::string arch = deepseek ? "deepseek" : "llama";
  const std::string a = arch + ".";
  b.kv_str("general.architecture", arch);
  b.kv_str("general.name", opt.name);
  // llama_ftype: ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0
  b.kv_u32("general.file_type", wt == GgufDType::kF16 ? 1 : wt == GgufDType::kQ8_0 ? 7 : 0);
  b.kv_u32(a + "vocab_size", uint32_t(m.vocab_size));
  b.kv_u32(a + "context_length", uint32_t(m.context));
  b.kv_u32(a + "embedding_length", uint32_t(m.d_model));
  b.kv_u32(a + "block_count", uint32_t(m.n_layer()));
  // The dense FFN width (deepseek: of the leading dense layers; the experts' width has its own key).
  b.kv_u32(a + "feed_forward_length", uint32_t(deepseek && m.n_dense_lead > 0 ? m.d_ff_dense : m.d_ff));
  b.kv_u32(a + "attention.head_count", uint32_t(m.n_head));
  b.kv_u32(a + "attention.head_count_kv", uint32_t(m.n_kv_head));
  b.kv_u32(a + "rope.dimension_count", uint32_t(m.head_dim()));
  b.kv_f32(a + "rope.freq_base", float(m.rope_theta));
  b.kv_f32(a + "attention.layer_norm_rms_epsilon", float(m.norm_eps));
  b.kv_u32(a + "expert_count", uint32_t(m.n_expert));
  b.kv_u32(a + "expert_used_count", uint32_t(m.n_expert_used));
  if (deepseek) {
    // llama.cpp's deepseek architecture (DeepSeekMoE): gates are the softmax probabilities of the chosen
    // experts, not renormalised, times expert_weights_scale; shared experts are added ungated.
    b.kv_u32(a + "leading_dense_block_count", uint32_t(m.n_dense_lead));
    b.kv_u32(a + "expert_feed_forward_length", uint32_t(m.d_ff));
    b.kv_u32(a + "expert_shared_count", uint32_t(m.n_shared));
    b.kv_f32(a + "expert_weights_scale", 1.0f);
  }

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
  auto* notes = opt.notes;
  b.tensor("token_embd.weight", m.embedding, wt, notes);
  b.tensor("output_norm.weight", m.final_norm, f32);
  if (m.head.defined()) b.tensor("output.weight", m.head, wt, notes);  // absent: tied to token_embd
  for (int64_t i = 0; i < m.n_layer(); ++i) {
    const auto& L = m.layers[size_t(i)];
    const std::string p = "blk." + std::to_string(i) + ".";
    b.tensor(p + "attn_norm.weight", L.attn_norm, f32);
    b.tensor(p + "attn_q.weight", qk(L.wq, m.n_head), wt, notes);
    b.tensor(p + "attn_k.weight", qk(L.wk, m.n_kv_head), wt, notes);
    b.tensor(p + "attn_v.weight", L.wv, wt, notes);
    b.tensor(p + "attn_output.weight", L.wo, wt, notes);
    b.tensor(p + "ffn_norm.weight", L.ffn_norm, f32);
    if (deepseek && i < m.n_dense_lead) {
      b.tensor(p + "ffn_gate.weight", L.dense_gate, wt, notes);
      b.tensor(p + "ffn_up.weight", L.dense_up, wt, notes);
      b.tensor(p + "ffn_down.weight", L.dense_down, wt, notes);
      continue;
    }
    // The router stays float32: its logits pick the experts, and f16 rounding could flip near-ties.
    b.tensor(p + "ffn_gate_inp.weight", L.router, f32);
    b.tensor(p + "ffn_gate_exps.weight", L.w_gate, wt, notes);
    b.tensor(p + "ffn_up_exps.weight", L.w_up, wt, notes);
    b.tensor(p + "ffn_down_exps.weight", L.w_down, wt, notes);
    if (deepseek) {
      b.tensor(p + "ffn_gate_shexp.weight", L.sh_gate, wt, notes);
      b.tensor(p + "ffn_up_shexp.weight", L.sh_up, wt, notes);
      b.tensor(p + "ffn_down_shexp.weight", L.sh_down, wt, notes);
    }
  }
  return b.finish();
}

void write_gguf(const std::string& path, const MixtralModel& m, const GgufExportOptions& opt) {
  write_file_atomic(path, gguf_bytes(m, opt));
}

}  // namespace moeforge
