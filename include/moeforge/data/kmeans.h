// Spherical k-means (docs/routing.md section 6): the offline clustering of sequence embeddings (mean-pooled
// hidden states of a checkpoint, or TF-IDF vectors). Vectors are L2-normalised, similarity is cosine,
// centroids are unit vectors; 25 iterations and 3 seeded restarts by default, as the reference code of the
// paper section 6 cites.
//
// Legend: M vectors of dimension D, G clusters.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace moeforge {

struct KMeansOptions {
  int64_t n_iter = 25;    // Lloyd iterations per restart (stops early when assignments stop changing)
  int64_t n_restart = 3;  // independent k-means++ starts; the best mean similarity wins
  uint64_t seed = 0;
};

struct KMeansResult {
  torch::Tensor centroids;     // [G, D] float32, unit rows
  torch::Tensor assignment;    // [M] int64, nearest centroid of each vector
  double mean_similarity = 0;  // mean over vectors of cosine(vector, its centroid): the objective maximised
};

// x: [M, D] (any float dtype, any device; computed on CPU in float32). Requires 1 <= G <= M.
KMeansResult spherical_kmeans(const torch::Tensor& x, int64_t n_cluster, const KMeansOptions& opt = {});

// Nearest centroid by cosine similarity: x [M, D], centroids [G, D] -> [M] int64 (CPU). For unseen
// sequences (generation, evaluation) and for online assignment.
torch::Tensor nearest_centroid(const torch::Tensor& x, const torch::Tensor& centroids);

}  // namespace moeforge
