// Packing documents into fixed-length training sequences, and seeded, resumable batching over them.
//
// Dimensions: N = number of packed sequences, S = seq_len, B = batch size.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moeforge/data/corpus.h"
#include "moeforge/data/random.h"
#include "moeforge/data/tokenizer.h"

namespace moeforge {

class ShardWindows;

// Some rows of a PackedData, as a batch holds them.
struct PackedRows {
  torch::Tensor tokens;      // [B, S + 1] int64
  torch::Tensor domain;      // [B] int64
  torch::Tensor doc;         // [B] int64, defined when the data has document ids
  torch::Tensor weight;      // [B, S] float32 target loss weights, defined when the data has them
  torch::Tensor prompt_len;  // [B] int64, defined when the data has it
};

// The packed sequences of one split: in memory (tokens and the per-row tensors), or read from memory-mapped
// shards (`shards` set, data.corpus = "shards:DIR"; the per-row tensors are then undefined and the rows are
// read when a batch asks for them, so that memory does not grow with the corpus; docs/data.md). Read rows
// through size(), seq_len(), rows() and row_range(), which serve both.
struct PackedData {
  torch::Tensor tokens;              // [N, S + 1] int64: inputs are [:, :-1], targets [:, 1:]
  torch::Tensor domain;              // [N] int64: domain id (index in `domains`) of each sequence
  std::vector<std::string> domains;  // sorted domain names
  // [N] int64: the document each sequence was cut from, and its window's index in that document
  // (pack_documents sets both; undefined for data made otherwise).
  torch::Tensor doc, window;
  // [N, S] float32: the loss weight of each target (tokens[:, 1:]). Undefined = 1 everywhere, as for the
  // corpora pack_documents packs; pack_samples gives prompt and padding targets 0, response targets 1.
  torch::Tensor weight;
  // [N] int64: the tokens of each row's prompt (<s> included), for routers that pool prompts
  // (RouteContext::prompt_len); pack_samples sets it when every row holds one sample (pack = false), else
  // undefined.
  torch::Tensor prompt_len;
  int64_t dropped = 0;  // samples pack_samples left out because they are longer than S + 1 tokens
  // The windows of a shard split (data/shards.h); null for data in memory.
  std::shared_ptr<const ShardWindows> shards;
  int64_t seq_len() const;
  int64_t size() const;  // 0 for data that holds nothing
  // Rows `index` ([B] int64), on the CPU.
  PackedRows rows(const torch::Tensor& index) const;
  // Rows [start, start + n).
  PackedRows row_range(int64_t start, int64_t n) const;
  // [N] int64: every row's domain id (for shards computed from the index, 8 bytes a row).
  torch::Tensor all_domains() const;
};

// A document's ids (no <s>, </s>). One larger than 256 KiB is encoded a group of whole lines at a time (at
// most that many bytes, or one line, which corpus readers cut to kMaxLineBytes), so the encoder's buffers
// stay bounded whatever the document's size (docs/reliability.md, "Shared folders and limits"); smaller
// documents are encoded whole.
std::vector<int64_t> encode_document(const Tokenizer& tok, const std::string& text);

// Each document becomes <s> text </s>, cut into windows of S + 1 tokens that overlap by one token (so each
// token is a target exactly once). Sequences never mix documents, so a sequence's domain label is exact.
// A document's tail shorter than S + 1 tokens is dropped, not padded: the model then needs no padding
// id and no loss mask. Documents of a domain not in `domains` -> std::invalid_argument naming it.
PackedData pack_documents(const std::vector<Document>& docs, const Tokenizer& tok, int64_t seq_len,
                          const std::vector<std::string>& domains);

struct InstructSample;

// Instruction samples (data/instruct.h) as rows of S + 1 tokens: each sample is <s> prompt response </s>,
// whole in one row, never cut (a sample longer than S + 1 tokens is left out and counted in `dropped`).
// With `pack`, a row takes the following samples of the same task while they fit (so its domain, the
// task, is exact), else each sample has its own row; the rest of a row is padded with </s>. weight is 1
// for the targets that are response tokens (the response and its </s>), 0 for prompt and padding targets,
// so that the loss sum(w * ce) / sum(w) is on the responses only (docs/instruct-data.md). Tasks not in
// `domains` -> std::invalid_argument naming them. doc = the row's first sample, window = 0.
PackedData pack_samples(const std::vector<InstructSample>& samples, const Tokenizer& tok, int64_t seq_len,
                        const std::vector<std::string>& domains, bool pack = true);

// Walks the sequences in batches, epoch after epoch. With shuffle, each epoch visits the sequences in
// a fresh order drawn from (seed, epoch) and drops the last partial batch so every batch has B rows;
// without shuffle, it visits them in order and the last batch of an epoch may be smaller (so an
// evaluation pass sees every sequence once).
class Batcher {
 public:
  // Throws std::invalid_argument when batch_size < 1 or, with shuffle, there are fewer than batch_size
  // sequences.
  Batcher(PackedData data, int64_t batch_size, uint64_t seed, bool shuffle);
  // Without shuffle, the sequences are visited in order, or (Order::kInterleaved, when the data has
  // document ids) by window index first and document second: the rows of one batch are the j-th windows
  // of different documents, never a window and its continuation. Batch-routed expert choice evaluates
  // on this order, since it lets the rows of a batch see each other (docs/routing.md, expert choice).
  enum class Order { kSequential, kInterleaved };
  Batcher(PackedData data, int64_t batch_size, Order order);

  using Batch = PackedRows;
  Batch next();

  int64_t epoch() const { return epoch_; }        // the epoch the next batch comes from
  int64_t position() const { return position_; }  // index of the next sequence within that epoch's order
  // next() then continues exactly as the original would have. Throws std::out_of_range on bad values.
  void restore(int64_t epoch, int64_t position);

  int64_t batches_per_epoch() const;
  const PackedData& data() const { return data_; }

 private:
  void start_epoch(int64_t epoch);
  PackedData data_;
  int64_t batch_size_;
  uint64_t seed_;
  bool shuffle_;
  Order order_kind_ = Order::kSequential;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  std::vector<int64_t> order_;     // [N] the current epoch's visiting order
  std::vector<uint32_t> order32_;  // [N] instead, for shuffled data of fewer than 2^32 sequences
};

}  // namespace moeforge
