// MoCE's offline sequence clustering before training (docs/routing.md section 6): every packed training
// sequence gets a cluster id, and the MoCE routers get centroids in their own representation space, so that
// an unseen sequence (evaluation, generation) goes to the nearest centroid of the clusters it was trained
// with.
//
// Legend: N sequences of S positions, C model width, G clusters, V vocabulary, D domains.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "moeforge/config/moe_config.h"
#include "moeforge/data/batching.h"
#include "moeforge/model/transformer.h"

namespace moeforge {

struct SequenceClusters {
  torch::Tensor assignment;    // [N] int64: cluster of each sequence
  torch::Tensor centroids;     // [G, C] unit rows in the space of the pooled first-MoE-layer input
  torch::Tensor sizes;         // [G] float64: sequences per cluster
  torch::Tensor mean;          // [C] mean pooled vector: the clustering space is centred on it
  double mean_similarity = 0;  // the k-means objective in the space it clustered (hidden or TF-IDF)
  std::vector<std::vector<int64_t>> cluster_domain;  // [G][D] sequences by (cluster, domain label)
};

// The representation MoCE's router assigns by: the mean-pooled input of the first MoE layer of each
// sequence's inputs (tokens[:, :S]), in eval mode without gradients. [N, C] float32 on CPU. Throws
// std::invalid_argument when the model has no MoE layer.
torch::Tensor pooled_first_moe_inputs(TransformerLM& model, const PackedData& data, int64_t batch_size);

// Offline clustering of `data` with spherical k-means (25 iterations, 3 restarts, `seed`):
//   kHidden: on pooled_first_moe_inputs; the router centroids are the k-means centroids.
//   kTfidf:  on TF-IDF bags of words of the sequences' inputs; the router centroids are the normalised
//            mean pooled representation of each cluster's sequences (the router cannot see words).
// Throws ConfigError naming moe.moce_clustering / moe.n_cluster on unusable settings.
SequenceClusters cluster_sequences(TransformerLM& model, const PackedData& data, SeqClustering how,
                                   int64_t n_cluster, int64_t vocab_size, uint64_t seed, int64_t batch_size);

// Gives the first MoE layer's MoCE router (the one that assigns clusters) the centroids and their sizes.
void set_router_centroids(TransformerLM& model, const SequenceClusters& clusters);

}  // namespace moeforge
