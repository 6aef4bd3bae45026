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
    auto* p = new sentencepiece::SentencePieceProcessor();
    const auto status = p->LoadFromSerializedProto(std::string(proto, proto_len));
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
