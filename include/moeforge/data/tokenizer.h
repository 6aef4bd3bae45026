// A SentencePiece BPE tokenizer (what Llama-family models use), trained on the training split.
// Ids: 0 = <unk>, 1 = <s> (bos), 2 = </s> (eos); no padding id.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moeforge {

struct CorpusSplit;
struct DataConfig;

class Tokenizer {
 public:
  // Trains in memory (no temporary files, no log output). Long texts are cut at spaces into pieces that
  // SentencePiece accepts as sentences. Deterministic for given texts, vocab_size and seed.
  // byte_fallback: 256 byte pieces for characters outside the vocabulary (DataConfig::byte_fallback).
  static Tokenizer train(const std::vector<std::string>& texts, int64_t vocab_size, uint64_t seed,
                         bool byte_fallback = false);
  // Throws std::invalid_argument when `model_proto` is not a SentencePiece model.
  static Tokenizer from_serialized(const std::string& model_proto);
  // Throws FileError naming the path.
  static Tokenizer load(const std::string& path);
  // Atomic write (temporary file, then rename).
  void save(const std::string& path) const;

  // The model proto bytes, saved with checkpoints.
  std::string serialized() const;

  std::vector<int64_t> encode(const std::string& text) const;  // no bos/eos added
  std::string decode(const std::vector<int64_t>& ids) const;

  int64_t vocab_size() const;
  int64_t bos_id() const;
  int64_t eos_id() const;

 private:
  struct Model;  // a SentencePiece model inside the shim module (see src/data/spm_shim/spm_shim.h)
  explicit Tokenizer(std::shared_ptr<const Model> model);
  // Shared and immutable: copies are cheap and encoding from several threads is safe.
  std::shared_ptr<const Model> model_;
};

// Trains on split.train (and split.tokenizer_extra), or re-uses the model cached under <cache_dir> for the
// same corpus, training documents (ids and texts), extra texts, vocab_size and seed. A cached file that fails
// to load is retrained over.
Tokenizer train_or_load_tokenizer(const CorpusSplit& split, const DataConfig& cfg,
                                  const std::string& cache_dir);

}  // namespace moeforge
