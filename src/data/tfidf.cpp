// Dimensions: n = number of sequences, V = vocabulary size.
#include "moeforge/data/tfidf.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace moeforge {

torch::Tensor tfidf_embeddings(const std::vector<std::vector<int64_t>>& token_ids, int64_t vocab_size) {
  if (vocab_size < 1) throw std::invalid_argument("tfidf_embeddings: vocab_size must be >= 1");
  const int64_t n = static_cast<int64_t>(token_ids.size());
  auto counts = torch::zeros({n, vocab_size}, torch::kFloat);  // [n, V] term counts
  auto c = counts.accessor<float, 2>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t id : token_ids[i]) {
      if (id < 0 || id >= vocab_size)
        throw std::out_of_range("tfidf_embeddings: sequence " + std::to_string(i) + " holds id " +
                                std::to_string(id) + ", outside [0, " + std::to_string(vocab_size) + ")");
      c[i][id] += 1.0f;
    }
  }
  auto lengths = counts.sum(1, /*keepdim=*/true).clamp_min(1.0);             // [n, 1]
  auto df = (counts > 0).to(torch::kFloat).sum(0);                           // [V]
  auto idf = torch::log((1.0 + static_cast<double>(n)) / (1.0 + df)) + 1.0;  // [V], >= 1: no term is zeroed
  auto tfidf = counts / lengths * idf;                                       // [n, V]
  // An empty row stays zero instead of dividing by zero.
  auto norms = tfidf.norm(2, /*dim=*/1, /*keepdim=*/true).clamp_min(1e-12);  // [n, 1]
  return tfidf / norms;
}

}  // namespace moeforge
