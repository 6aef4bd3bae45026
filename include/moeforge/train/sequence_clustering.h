// Offline sequence clustering before training (docs/routing.md section 6), for a router that asks for it
// (Router::offline_clustering; docs/routing.md section 6 says which router asks and how): every packed
// training sequence gets a cluster id, and the first MoE layer's router gets centroids in its own
// representation space, so that an unseen sequence (evaluation, generation) goes to the nearest centroid of
// the clusters it was trained with.
//
// Legend: N sequences of S positions, C model width, G clusters, V vocabulary, D domains.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moeforge/data/batching.h"
#include "moeforge/model/transformer.h"
#include "moeforge/routing/router.h"

namespace moeforge {

struct SequenceClusters {
  torch::Tensor assignment;    // [N] int64: cluster of each sequence
  torch::Tensor centroids;     // [G, C] unit rows in the space of the router's sequence representation
  torch::Tensor sizes;         // [G] float64: sequences per cluster
  torch::Tensor mean;          // [C] mean representation: the clustering space is centred on it
  double mean_similarity = 0;  // the k-means objective in the space it clustered (hidden or TF-IDF)
  std::vector<std::vector<int64_t>> cluster_domain;  // [G][D] sequences by (cluster, domain label)
};

// The representation the first MoE layer's router assigns each sequence of `data` by
// (Router::sequence_representation: e.g. the mean-pooled router input of the sequence, or of its prompt),
// over the sequences' inputs (tokens[:, :S]) in eval mode without gradients.
// [N, C] float32 on CPU. Throws std::invalid_argument when the model has no MoE layer or its router has
// no sequence representation.
torch::Tensor sequence_representations(TransformerLM& model, const PackedData& data, int64_t batch_size);

// The most training sequences an offline clustering sees: a larger split (a shard folder of a large corpus)
// is clustered on a seeded sample of this many of its sequences, so that its time and memory (TF-IDF rows are
// [N, V]) do not grow with the corpus. Brown's 13.5k sequences at seq_len 128 are clustered whole.
constexpr int64_t kMaxClusterSequences = 16384;

// Offline clustering of `data` (at most kMaxClusterSequences of its sequences: `assignment`, `sizes` and
// `cluster_domain` are then of the sample) with spherical k-means (25 iterations, 3 restarts, `seed`), as
// `how` asks:
//   "hidden": on sequence_representations; the router centroids are the k-means centroids.
//   "tfidf":  on TF-IDF bags of words of the sequences' inputs (the prompt's words only with
//             how.prompt_only and prompt rows); the router centroids are the normalised mean
//             representation of each cluster's sequences (the router cannot see words).
// Throws ConfigError naming how.key or moe.n_cluster on unusable settings.
SequenceClusters cluster_sequences(TransformerLM& model, const PackedData& data,
                                   const Router::OfflineClustering& how, int64_t vocab_size, uint64_t seed,
                                   int64_t batch_size);

// Gives the first MoE layer's router (the one that assigns clusters; later layers keep its clusters) the
// centroids and their sizes (Router::set_sequence_centroids; ConfigError naming `key` when it has none).
void set_router_centroids(TransformerLM& model, const SequenceClusters& clusters, const std::string& key);

}  // namespace moeforge
