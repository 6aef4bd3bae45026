// Dimensions: N = number of packed sequences, S = seq_len, B = batch size.
#include "moeforge/data/batching.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>

#include "moeforge/data/instruct.h"
#include "moeforge/data/shards.h"

namespace moeforge {

namespace {

constexpr size_t kEncodeChunkBytes = 256 * 1024;

}  // namespace

std::vector<int64_t> encode_document(const Tokenizer& tok, const std::string& text) {
  if (text.size() <= kEncodeChunkBytes) return tok.encode(text);
  std::vector<int64_t> ids;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = std::min(text.size(), start + kEncodeChunkBytes);
    if (end < text.size()) {
      const size_t nl = text.rfind('\n', end);
      end = nl != std::string::npos && nl > start ? nl + 1 : std::min(text.size(), text.find('\n', end) + 1);
      if (end <= start) end = text.size();
    }
    auto part = tok.encode(text.substr(start, end - start));
    ids.insert(ids.end(), part.begin(), part.end());
    start = end;
  }
  return ids;
}

PackedData pack_documents(const std::vector<Document>& docs, const Tokenizer& tok, int64_t seq_len,
                          const std::vector<std::string>& domains) {
  if (seq_len < 1) throw std::invalid_argument("pack_documents: seq_len must be >= 1");
  const int64_t n_doc = static_cast<int64_t>(docs.size());
  std::vector<int64_t> doc_domain(docs.size());
  for (int64_t i = 0; i < n_doc; ++i) {
    doc_domain[i] = domain_id(domains, docs[i].domain);
    if (doc_domain[i] < 0)
      throw std::invalid_argument("pack_documents: document '" + docs[i].id + "' has domain '" +
                                  docs[i].domain + "', which is not in the domain list");
  }
  // SentencePiece's encoder is const and thread-safe; encoding is most of the cost.
  std::vector<std::vector<int64_t>> ids(docs.size());
  at::parallel_for(0, n_doc, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto body = encode_document(tok, docs[i].text);
      ids[i].reserve(body.size() + 2);
      ids[i].push_back(tok.bos_id());
      ids[i].insert(ids[i].end(), body.begin(), body.end());
      ids[i].push_back(tok.eos_id());
    }
  });
  // A document of L tokens gives (L - 1) / S windows: window j holds tokens [j*S, j*S + S], so the last
  // token of one window is the first input of the next and every token after the first is a target once.
  int64_t n_seq = 0;
  for (const auto& d : ids) n_seq += (static_cast<int64_t>(d.size()) - 1) / seq_len;

  PackedData out;
  out.tokens = torch::empty({n_seq, seq_len + 1}, torch::kLong);  // [N, S + 1]
  out.domain = torch::empty({n_seq}, torch::kLong);               // [N]
  out.domains = domains;
  out.doc = torch::empty({n_seq}, torch::kLong);     // [N]
  out.window = torch::empty({n_seq}, torch::kLong);  // [N]
  int64_t* tokens = out.tokens.data_ptr<int64_t>();
  int64_t* domain = out.domain.data_ptr<int64_t>();
  int64_t* doc = out.doc.data_ptr<int64_t>();
  int64_t* window = out.window.data_ptr<int64_t>();
  int64_t row = 0;
  for (int64_t i = 0; i < n_doc; ++i) {
    const int64_t windows = (static_cast<int64_t>(ids[i].size()) - 1) / seq_len;
    for (int64_t j = 0; j < windows; ++j, ++row) {
      std::copy_n(ids[i].data() + j * seq_len, seq_len + 1, tokens + row * (seq_len + 1));
      domain[row] = doc_domain[i];
      doc[row] = i;
      window[row] = j;
    }
  }
  return out;
}

PackedData pack_samples(const std::vector<InstructSample>& samples, const Tokenizer& tok, int64_t seq_len,
                        const std::vector<std::string>& domains, bool pack) {
  if (seq_len < 1) throw std::invalid_argument("pack_samples: seq_len must be >= 1");
  const int64_t n = static_cast<int64_t>(samples.size());
  std::vector<int64_t> sample_domain(samples.size());
  for (int64_t i = 0; i < n; ++i) {
    sample_domain[i] = domain_id(domains, samples[i].task);
    if (sample_domain[i] < 0)
      throw std::invalid_argument("pack_samples: task '" + samples[i].task + "' is not in the domain list");
  }
  // ids[i] = <s> prompt response </s>; n_prompt[i] = the tokens before the response (<s> and the prompt).
  // Encoding the two parts apart gives the same pieces as encoding them joined by a space, since BPE
  // pieces never cross spaces (docs/data.md), and marks the boundary exactly.
  std::vector<std::vector<int64_t>> ids(samples.size());
  std::vector<int64_t> n_prompt(samples.size());
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto prompt = tok.encode(samples[i].prompt);
      auto response = tok.encode(samples[i].response);
      ids[i].push_back(tok.bos_id());
      ids[i].insert(ids[i].end(), prompt.begin(), prompt.end());
      n_prompt[i] = static_cast<int64_t>(ids[i].size());
      ids[i].insert(ids[i].end(), response.begin(), response.end());
      ids[i].push_back(tok.eos_id());
    }
  });
  const int64_t width = seq_len + 1;
  std::vector<int64_t> tokens, domain, first, row_prompt;
  std::vector<float> scored;  // [rows * width]: 1 where the token is part of a response
  int64_t fill = width;       // tokens used in the last row; `width` = no open row
  int64_t dropped = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = static_cast<int64_t>(ids[i].size());
    if (len > width) {
      ++dropped;
      continue;
    }
    const bool fits = pack && fill + len <= width && domain.back() == sample_domain[i];
    if (!fits) {
      tokens.resize(tokens.size() + width, tok.eos_id());
      scored.resize(scored.size() + width, 0.0f);
      domain.push_back(sample_domain[i]);
      first.push_back(i);
      row_prompt.push_back(n_prompt[i]);
      fill = 0;
    }
    const size_t at = tokens.size() - static_cast<size_t>(width - fill);
    std::copy(ids[i].begin(), ids[i].end(), tokens.begin() + static_cast<std::ptrdiff_t>(at));
    std::fill(scored.begin() + static_cast<std::ptrdiff_t>(at + n_prompt[i]),
              scored.begin() + static_cast<std::ptrdiff_t>(at + len), 1.0f);
    fill += len;
  }
  const int64_t rows = static_cast<int64_t>(domain.size());
  if (rows == 0) {  // from_blob needs storage to point at
    tokens.push_back(0);
    scored.push_back(0);
  }
  PackedData out;
  out.tokens = torch::from_blob(tokens.data(), {rows, width}, torch::kLong).clone();  // [N, S + 1]
  // The weight of target j is whether token j + 1 is a response token.
  out.weight =
      torch::from_blob(scored.data(), {rows, width}, torch::kFloat).narrow(1, 1, seq_len).clone();  // [N, S]
  out.domain = torch::tensor(domain, torch::kLong);                                                 // [N]
  out.doc = torch::tensor(first, torch::kLong);                                                     // [N]
  out.window = torch::zeros({rows}, torch::kLong);                                                  // [N]
  if (!pack) out.prompt_len = torch::tensor(row_prompt, torch::kLong);                              // [N]
  out.domains = domains;
  out.dropped = dropped;
  return out;
}

int64_t PackedData::seq_len() const {
  return shards ? shards->seq_len() : tokens.defined() ? tokens.size(1) - 1 : 0;
}

int64_t PackedData::size() const {
  return shards ? shards->size() : tokens.defined() ? tokens.size(0) : 0;
}

PackedRows PackedData::rows(const torch::Tensor& index) const {
  if (!shards) {
    PackedRows b{tokens.index_select(0, index), domain.index_select(0, index), {}, {}, {}};
    if (doc.defined()) b.doc = doc.index_select(0, index);
    if (weight.defined()) b.weight = weight.index_select(0, index);
    if (prompt_len.defined()) b.prompt_len = prompt_len.index_select(0, index);
    return b;
  }
  auto idx = index.to(torch::kCPU, torch::kLong).contiguous();  // [B]
  const int64_t B = idx.size(0);
  const int64_t* ix = idx.data_ptr<int64_t>();
  PackedRows b;
  b.tokens = torch::empty({B, seq_len() + 1}, torch::kLong);  // [B, S + 1]
  shards->rows(ix, B, b.tokens.data_ptr<int64_t>());
  b.domain = torch::empty({B}, torch::kLong);  // [B]
  b.doc = torch::empty({B}, torch::kLong);     // [B]
  for (int64_t i = 0; i < B; ++i) {
    b.doc.data_ptr<int64_t>()[i] = shards->doc_of(ix[i]);
    b.domain.data_ptr<int64_t>()[i] = shards->domain_of(ix[i]);
  }
  return b;
}

PackedRows PackedData::row_range(int64_t start, int64_t n) const {
  return rows(torch::arange(start, start + n, torch::kLong));
}

torch::Tensor PackedData::all_domains() const {
  if (!shards) return domain;
  auto out = torch::empty({size()}, torch::kLong);  // [N]
  for (int64_t i = 0; i < size(); ++i) out.data_ptr<int64_t>()[i] = shards->domain_of(i);
  return out;
}

Batcher::Batcher(PackedData data, int64_t batch_size, uint64_t seed, bool shuffle)
    : data_(std::move(data)), batch_size_(batch_size), seed_(seed), shuffle_(shuffle) {
  if (batch_size_ < 1) throw std::invalid_argument("Batcher: batch_size must be >= 1");
  if (data_.size() < 1)
    throw std::invalid_argument("Batcher: no sequences (documents shorter than seq_len?)");
  if (data_.weight.defined() && (data_.weight.dim() != 2 || data_.weight.size(0) != data_.size() ||
                                 data_.weight.size(1) != data_.seq_len()))
    throw std::invalid_argument("Batcher: loss weights must be [" + std::to_string(data_.size()) + ", " +
                                std::to_string(data_.seq_len()) + "], one per target");
  if (shuffle_ && data_.size() < batch_size_)
    throw std::invalid_argument("Batcher: " + std::to_string(data_.size()) +
                                " sequences are fewer than batch_size " + std::to_string(batch_size_));
  start_epoch(0);
}

Batcher::Batcher(PackedData data, int64_t batch_size, Order order)
    : Batcher(std::move(data), batch_size, 0, false) {
  order_kind_ = order;
  if (order != Order::kInterleaved) return;
  if (data_.shards) {
    order_ = data_.shards->interleaved_order();
    return;
  }
  if (!data_.doc.defined() || !data_.window.defined()) return;
  auto doc_t = data_.doc.contiguous();
  auto win_t = data_.window.contiguous();
  const int64_t* doc = doc_t.data_ptr<int64_t>();
  const int64_t* win = win_t.data_ptr<int64_t>();
  std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) {
    return win[a] != win[b] ? win[a] < win[b] : doc[a] < doc[b];
  });
}

int64_t Batcher::batches_per_epoch() const {
  const int64_t n = data_.size();
  return shuffle_ ? n / batch_size_ : (n + batch_size_ - 1) / batch_size_;
}

void Batcher::start_epoch(int64_t epoch) {
  epoch_ = epoch;
  position_ = 0;
  if (shuffle_) {
    // Each epoch's order depends only on (seed, epoch), so restore() can rebuild it without replaying.
    // Held in 32 bits when it fits (8 -> 4 bytes a sequence: 18 MB for 4.4M windows of a 2 GB corpus), and
    // the previous epoch's order freed before the next is drawn, so two never coexist.
    const uint64_t seed = seed_ ^ (0x9E3779B97F4A7C15ull * static_cast<uint64_t>(epoch + 1));
    order_ = {};
    order32_ = {};
    if (data_.size() <= int64_t(UINT32_MAX))
      order32_ = seeded_permutation32(data_.size(), seed);
    else
      order_ = seeded_permutation(data_.size(), seed);
  } else if (static_cast<int64_t>(order_.size()) != data_.size()) {
    order_.resize(static_cast<size_t>(data_.size()));
    std::iota(order_.begin(), order_.end(), int64_t{0});
  }
}

Batcher::Batch Batcher::next() {
  const int64_t n = data_.size();
  // With shuffle an epoch ends when a full batch no longer fits; without, when every sequence was visited.
  const bool epoch_done = shuffle_ ? position_ + batch_size_ > n : position_ >= n;
  if (epoch_done) start_epoch(epoch_ + 1);
  const int64_t take = std::min(batch_size_, n - position_);
  auto index = torch::empty({take}, torch::kLong);  // [B]
  for (int64_t i = 0; i < take; ++i)
    index.data_ptr<int64_t>()[i] =
        order32_.empty() ? order_[size_t(position_ + i)] : int64_t(order32_[size_t(position_ + i)]);
  position_ += take;
  return data_.rows(index);
}

void Batcher::restore(int64_t epoch, int64_t position) {
  if (epoch < 0 || position < 0 || position > data_.size())
    throw std::out_of_range("Batcher::restore: epoch " + std::to_string(epoch) + ", position " +
                            std::to_string(position) + " is outside [0, " + std::to_string(data_.size()) +
                            "]");
  start_epoch(epoch);
  position_ = position;
}

}  // namespace moeforge
