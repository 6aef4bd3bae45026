// A tokenized corpus on disk, written once by `moeforge tokenize` and read memory-mapped by training and
// evaluation (data.corpus = "shards:DIR"; docs/data.md, "Shards").
//
// A shard folder holds, for each split (train, validation, heldout) that has documents:
//   <split>.bin  the token ids of every document as <s> ids </s>, one after the other, little-endian,
//                uint16 when the vocabulary fits in 16 bits, else uint32;
//   <split>.idx  the documents' token offsets into <split>.bin, D+1 uint64 (the first 0, the last the file's
//                token count), then their domain ids, D int32 (indices into the manifest's domain list);
// and tokenizer.model (the SentencePiece model the ids are of) and manifest.json (format, widths, counts,
// domains, every file's size and CRC-32, and how the folder was made). Windows of seq_len + 1 tokens are cut
// at load time, as pack_documents cuts them: the same folder serves any data.seq_len.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/data/tokenizer.h"

namespace moeforge {

constexpr const char* kShardFormat = "moeforge-shards-1";
const std::vector<std::string>& shard_splits();  // {"train", "validation", "heldout"}

// Writes a shard folder document by document with bounded memory: token and index files are written as the
// documents come, into <out>.tmp-<pid>, which finish() renames to <out> once every file is complete and
// synced (a crash leaves no half-written <out>). An existing <out> is a FileError.
class ShardWriter {
 public:
  ShardWriter(const std::string& out_dir, const Tokenizer& tokenizer);
  ~ShardWriter();  // without finish(): the temporary folder is removed
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Appends one document's ids (without <s> and </s>) to `split` under domain `domain`.
  void add(const std::string& split, const std::string& domain, const std::vector<int64_t>& ids);
  // Writes tokenizer.model and manifest.json (with `extra` merged into it), syncs and renames into place.
  // Returns the manifest.
  nlohmann::json finish(const nlohmann::json& extra);

  int64_t documents() const;
  uint64_t tokens() const;

 private:
  struct Split;
  std::string out_, tmp_;
  const Tokenizer& tok_;
  int width_;                         // bytes per id
  std::vector<std::string> domains_;  // in first-seen order
  std::vector<std::unique_ptr<Split>> splits_;
  bool finished_ = false;
  int32_t domain_id(const std::string& name);
  Split& split(const std::string& name);
};

// One split of a shard folder, memory-mapped: its documents' tokens, offsets and domains.
class ShardSplit {
 public:
  ShardSplit(const std::string& bin_path, const std::string& idx_path, int width, int64_t n_docs,
             uint64_t n_tokens);
  ~ShardSplit();
  ShardSplit(const ShardSplit&) = delete;
  ShardSplit& operator=(const ShardSplit&) = delete;
  int64_t n_docs() const { return int64_t(domain_.size()); }
  uint64_t n_tokens() const { return offsets_.empty() ? 0 : offsets_.back(); }
  uint64_t doc_begin(int64_t d) const { return offsets_[size_t(d)]; }
  uint64_t doc_end(int64_t d) const { return offsets_[size_t(d) + 1]; }
  int32_t doc_domain(int64_t d) const { return domain_[size_t(d)]; }
  // Tokens [begin, begin + n) as int64 into out.
  void read(uint64_t begin, int64_t n, int64_t* out) const;
  // The largest token id in the split (a scan of the whole file), for the check against the tokenizer.
  uint32_t max_id() const;
  const std::string& bin_path() const { return bin_path_; }
  // Remaps domain ids through `to` (ids into another list), once at load.
  void remap_domains(const std::vector<int32_t>& to);

 private:
  std::string bin_path_;
  int width_;
  const unsigned char* map_ = nullptr;
  size_t map_bytes_ = 0;
  std::vector<uint64_t> offsets_;  // [D+1]
  void release(uint64_t from_byte, uint64_t to_byte) const;
  std::vector<int32_t> domain_;  // [D]
};

// A shard folder opened for reading: every file's size and CRC-32 checked against the manifest (a truncated
// or corrupted shard is a FileError naming the file, never a wrong batch), the splits mapped.
struct ShardSet {
  std::string dir;
  nlohmann::json manifest;
  std::string tokenizer_model;       // the serialized SentencePiece model
  std::vector<std::string> domains;  // sorted; every split's domain ids index into it
  std::shared_ptr<const ShardSplit> train, validation, heldout;  // null when the split has no document
};
ShardSet open_shards(const std::string& dir);

// The windows of seq_len + 1 tokens of a split, as pack_documents cuts a document into them (window j of a
// document of L tokens starts at token j * seq_len; (L - 1) / seq_len windows, a shorter tail dropped), in
// document order; per document only its window count is kept, so the memory is 8 bytes per document.
class ShardWindows {
 public:
  ShardWindows(std::shared_ptr<const ShardSplit> split, int64_t seq_len);
  int64_t size() const { return n_; }
  int64_t seq_len() const { return seq_len_; }
  // Rows [B, S + 1] int64 of windows `index` (int64 [B]).
  void rows(const int64_t* index, int64_t n, int64_t* out) const;
  int64_t doc_of(int64_t window) const;
  int64_t window_in_doc(int64_t window) const;
  int64_t domain_of(int64_t window) const { return split_->doc_domain(doc_of(window)); }
  // The windows by window index within their document first, document second (Batcher::Order::kInterleaved).
  std::vector<int64_t> interleaved_order() const;

 private:
  std::shared_ptr<const ShardSplit> split_;
  int64_t seq_len_, n_ = 0;
  std::vector<uint64_t> first_;  // [D+1] windows before document d
};

}  // namespace moeforge
