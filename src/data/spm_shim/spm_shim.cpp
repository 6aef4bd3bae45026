// The SentencePiece shim module: see spm_shim.h for why it exists.
#include "spm_shim.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// SentencePiece rejects "sentences" longer than max_sentence_length (4192 bytes by default); a Brown
// document is ~11 kB. BPE pieces never cross spaces (split_by_whitespace), so cutting at spaces loses
// nothing.
constexpr size_t kMaxPieceBytes = 2048;

// Feeds the training texts to SentencePiece from memory, cut into pieces of at most kMaxPieceBytes.
class TextIterator : public sentencepiece::SentenceIterator {
 public:
  TextIterator(const char* const* texts, const size_t* lengths, size_t n)
      : texts_(texts), lengths_(lengths), n_(n) {
    advance();
  }
  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void advance() {
    while (text_ < n_) {
      const char* t = texts_[text_];
      const size_t size = lengths_[text_];
      while (offset_ < size && t[offset_] == ' ') ++offset_;
      if (offset_ >= size) {
        ++text_;
        offset_ = 0;
        continue;
      }
      size_t end = std::min(size, offset_ + kMaxPieceBytes);
      if (end < size) {
        size_t space = end;
        while (space > offset_ && t[space] != ' ') --space;
        if (space > offset_) end = space;  // else one huge word: cut it anywhere
      }
      value_.assign(t + offset_, end - offset_);
      offset_ = end;
      return;
    }
    done_ = true;
  }
  const char* const* texts_;
  const size_t* lengths_;
  size_t n_;
  size_t text_ = 0;
  size_t offset_ = 0;
  std::string value_;
  bool done_ = false;
};

char* copy_out(const std::string& s, size_t* len = nullptr) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  std::memcpy(out, s.data(), s.size());
  out[s.size()] = '\0';
  if (len) *len = s.size();
  return out;
}

int fail(char** error, const std::string& message) {
  *error = copy_out(message);
  return 1;
}

const sentencepiece::SentencePieceProcessor* sp(const void* model) {
  return static_cast<const sentencepiece::SentencePieceProcessor*>(model);
}

// --- Checking a model's normaliser tables before SentencePiece uses them (docs/reliability.md) ---
// SentencePiece trusts the precompiled_charsmap of a model: a double-array trie and the strings its
// leaves point into. A hostile table makes Normalizer::NormalizePrefix read out of bounds (a fuzz finding).
// The shim therefore reads the table from the serialized ModelProto (protobuf wire format:
// ModelProto.normalizer_spec = 3 and denormalizer_spec = 5, NormalizerSpec.precompiled_charsmap = 2; the
// last occurrence wins, as protobuf merges) and walks every trie node the normaliser can reach.

bool read_varint(const std::string& b, size_t& pos, uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (pos >= b.size()) return false;
    const uint8_t c = static_cast<uint8_t>(b[pos++]);
    v |= uint64_t(c & 0x7f) << shift;
    if (!(c & 0x80)) return true;
  }
  return false;
}

// Calls on_field(number, bytes) for every length-delimited field of a message; false if malformed.
template <class F>
bool for_each_bytes_field(const std::string& b, F on_field) {
  size_t pos = 0;
  while (pos < b.size()) {
    uint64_t tag = 0, v = 0;
    if (!read_varint(b, pos, tag)) return false;
    switch (tag & 7) {
      case 0:
        if (!read_varint(b, pos, v)) return false;
        break;
      case 1:
        if (b.size() - pos < 8) return false;
        pos += 8;
        break;
      case 2:
        if (!read_varint(b, pos, v) || v > b.size() - pos) return false;
        on_field(tag >> 3, b.substr(pos, size_t(v)));
        pos += size_t(v);
        break;
      case 5:
        if (b.size() - pos < 4) return false;
        pos += 4;
        break;
      default:
        return false;  // groups (3, 4) are not used by ModelProto
    }
  }
  return true;
}

// Empty if the precompiled_charsmap `blob` is safe for SentencePiece's normaliser, else what is wrong.
std::string check_charsmap(const std::string& blob) {
  if (blob.empty()) return "";
  if (blob.size() < 4) return "table shorter than its 4-byte header";
  uint32_t trie_bytes = 0;
  std::memcpy(&trie_bytes, blob.data(), 4);  // little-endian, as SentencePiece reads it on x86
  if (trie_bytes >= blob.size() - 4 + 1 || trie_bytes % 4 != 0) return "trie size outside the table";
  const size_t n = trie_bytes / 4;
  if (n == 0) return "empty trie";
  std::vector<uint32_t> units(n);
  std::memcpy(units.data(), blob.data() + 4, trie_bytes);
  const char* normalized = blob.data() + 4 + trie_bytes;
  const size_t normalized_size = blob.size() - 4 - trie_bytes;
  auto offset = [](uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); };
  auto has_leaf = [](uint32_t u) { return ((u >> 8) & 1) == 1; };
  auto label = [](uint32_t u) { return u & ((1u << 31) | 0xff); };
  std::vector<char> seen(n, 0);
  std::vector<uint32_t> todo = {0};
  seen[0] = 1;
  while (!todo.empty()) {
    const uint32_t p = todo.back();
    todo.pop_back();
    const uint32_t base = p ^ offset(units[p]);
    if (has_leaf(units[p]) && p != 0) {
      if (base >= n) return "a leaf points outside the trie";
      const uint32_t value = units[base] & ((1u << 31) - 1);
      if (value >= normalized_size ||
          std::memchr(normalized + value, '\0', normalized_size - value) == nullptr)
        return "a leaf points outside the normalised strings";
    }
    for (uint32_t c = 0; c < 256; ++c) {
      const uint32_t q = base ^ c;
      if (q >= n) return "a trie transition points outside the trie";
      if (label(units[q]) == c && !seen[q]) {
        seen[q] = 1;
        todo.push_back(q);
      }
    }
  }
  return "";
}

// Empty if `proto`'s normaliser tables are safe, else what is wrong.
std::string check_model_tables(const std::string& proto) {
  std::string spec[6];
  bool present[6] = {false, false, false, false, false, false};
  if (!for_each_bytes_field(proto, [&](uint64_t field, const std::string& bytes) {
        if (field == 3 || field == 5) {
          present[field] = true;
          spec[field] += bytes;  // protobuf merges repeated occurrences of a message field
        }
      }))
    return "malformed model proto";
  for (int f : {3, 5}) {
    if (!present[f]) continue;
    std::string charsmap;
    bool ok = for_each_bytes_field(spec[f], [&](uint64_t field, const std::string& bytes) {
      if (field == 2) charsmap = bytes;  // the last one wins
    });
    if (!ok) return "malformed normalizer spec";
    const std::string why = check_charsmap(charsmap);
    if (!why.empty())
      return std::string(f == 3 ? "normalizer" : "denormalizer") + " table (precompiled_charsmap): " + why;
  }
  return "";
}
}  // namespace

extern "C" {

int moeforge_spm_train(const char* const* texts, const size_t* lengths, size_t n_texts, int64_t vocab_size,
                       uint64_t seed, int n_threads, int byte_fallback, char** proto, size_t* proto_len,
                       char** error) {
  try {
    sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned int>(seed));
    const std::unordered_map<std::string, std::string> args = {
        {"model_type", "bpe"},
        {"vocab_size", std::to_string(vocab_size)},
        // Keep every character seen in training (Brown is nearly all ASCII); the rest maps to <unk>.
        {"character_coverage", "1.0"},
        // Digits one by one, as Llama does: numbers then do not eat the vocabulary.
        {"split_digits", "true"},
        {"num_threads", std::to_string(n_threads)},
        {"minloglevel", "2"},  // errors only: training is quiet
        {"byte_fallback", byte_fallback ? "true" : "false"},
    };
    TextIterator it(texts, lengths, n_texts);
    std::string out;
    const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &out);
    if (!status.ok()) return fail(error, status.ToString());
    *proto = copy_out(out, proto_len);
    return 0;
  } catch (const std::exception& e) {
    return fail(error, e.what());
  }
}

int moeforge_spm_load(const char* proto, size_t proto_len, void** model, char** error) {
  try {
    const std::string bytes(proto, proto_len);
    const std::string unsafe = check_model_tables(bytes);
    if (!unsafe.empty()) return fail(error, "unsafe model: " + unsafe);
    auto* p = new sentencepiece::SentencePieceProcessor();
    const auto status = p->LoadFromSerializedProto(bytes);
    if (!status.ok() || p->GetPieceSize() <= 0) {
      delete p;
      return fail(error, status.ok() ? std::string("the model has no pieces") : status.ToString());
    }
    *model = p;
    return 0;
  } catch (const std::exception& e) {
    return fail(error, e.what());
  }
}

void moeforge_spm_release(void* model) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(model);
}

int moeforge_spm_encode(const void* model, const char* text, size_t text_len, int32_t** ids, size_t* n_ids,
                        char** error) {
  try {
    std::vector<int> out;
    const auto status = sp(model)->Encode(std::string(text, text_len), &out);
    if (!status.ok()) return fail(error, status.ToString());
    *ids = static_cast<int32_t*>(std::malloc(std::max<size_t>(out.size(), 1) * sizeof(int32_t)));
    for (size_t i = 0; i < out.size(); ++i) (*ids)[i] = out[i];
    *n_ids = out.size();
    return 0;
  } catch (const std::exception& e) {
    return fail(error, e.what());
  }
}

int moeforge_spm_decode(const void* model, const int32_t* ids, size_t n_ids, char** text, size_t* text_len,
                        char** error) {
  try {
    std::string out;
    const auto status = sp(model)->Decode(std::vector<int>(ids, ids + n_ids), &out);
    if (!status.ok()) return fail(error, status.ToString());
    *text = copy_out(out, text_len);
    return 0;
  } catch (const std::exception& e) {
    return fail(error, e.what());
  }
}

int moeforge_spm_serialize(const void* model, char** proto, size_t* proto_len, char** error) {
  try {
    const auto bytes = sp(model)->serialized_model_proto();
    *proto = copy_out(std::string(bytes.data(), bytes.size()), proto_len);
    return 0;
  } catch (const std::exception& e) {
    return fail(error, e.what());
  }
}

void moeforge_spm_info(const void* model, int64_t* vocab_size, int64_t* bos_id, int64_t* eos_id) {
  *vocab_size = sp(model)->GetPieceSize();
  *bos_id = sp(model)->bos_id();
  *eos_id = sp(model)->eos_id();
}

void moeforge_spm_free(void* buffer) {
  std::free(buffer);
}

}  // extern "C"
