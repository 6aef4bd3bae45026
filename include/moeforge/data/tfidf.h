// TF-IDF bag-of-words vectors of token sequences, for offline sequence clustering (docs/routing.md section
// 6).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace moeforge {

// [n, vocab_size] float32, one row per sequence: term frequency (count / length) times smoothed inverse
// document frequency log((1 + n) / (1 + df)) + 1 (scikit-learn's default), each row L2-normalised.
// An empty sequence gives a zero row. Ids outside [0, vocab_size) -> std::out_of_range naming the row.
torch::Tensor tfidf_embeddings(const std::vector<std::vector<int64_t>>& token_ids, int64_t vocab_size);

}  // namespace moeforge
