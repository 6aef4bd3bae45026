// The MoCE router's own [moe] keys (docs/routing.md section 6), bound and checked by its registry row
// (src/routing/moce.cpp). moe.n_cluster (G) is a common key: the hierarchical router has clusters too;
// moe.n_expert_used is K inside the group. A section header (docs/architecture.md, "Config sections").
#pragma once

#include <cstdint>
#include <string>

namespace moeforge {

// What MoCE pools to assign a token its cluster.
enum class MocePool { kPrefix, kSequence, kPrompt };
// How a token's cluster is chosen from its pool (docs/routing.md, MoCE ablations): the nearest centroid
// (MoCE's rule), or a learned linear gate over the clusters.
enum class MoceAssign { kCentroid, kGate };
// How the training sequences' clusters start: online, or from an offline clustering before training.
enum class SeqClustering { kOnline, kHidden, kTfidf };

struct MoceOptions {
  int64_t n_general = 0;         // moe.moce_n_general: general experts (the last ones of n_expert)
  int64_t general_used = 1;      // moe.moce_general_used: general experts per token
  double centroid_decay = 0.99;  // moe.centroid_decay: EMA decay of the online centroids
  // moe.moce_pool: "prefix" (causal, the default: a token's cluster is that of the running mean of the
  // positions up to it), "sequence" (NON-CAUSAL: the whole sequence's mean, labelled so in reports) or
  // "prompt" (instruction data, MoCE's own setting: the running mean up to the end of the prompt, then the
  // prompt's mean for every later position, so the cluster depends on the instruction and input only;
  // needs data.corpus = "instruct" with data.instruct_pack = false).
  MocePool pool = MocePool::kPrefix;
  double balance_rate = 1e-3;  // moe.moce_balance_rate: step of the cluster balance bias (0 = off)
  // moe.moce_clustering: "online" (the default: works from scratch) moves the centroids from each batch;
  // "hidden" clusters, before training, the router's own sequence representation (the mean-pooled
  // first-MoE-layer input) of every training sequence under the --init checkpoint's weights with
  // spherical k-means and makes the k-means centroids the router's; "tfidf" clusters TF-IDF bags of words
  // and gives the router the mean representation of each cluster. Either way the router then assigns
  // every sequence itself, by the same rule in training, evaluation and generation.
  SeqClustering clustering = SeqClustering::kOnline;
  // moe.moce_assign: "centroid" (the default, MoCE's rule: nearest online centroid plus the balance bias)
  // or "gate" (a learned gate W_s [G, C] on the same stop-gradient pool: argmax of W_s pool + bias; it
  // learns through a straight-through scale p_c / stop_gradient(p_c) of the routed output, 1 in value).
  MoceAssign assign = MoceAssign::kCentroid;
  // moe.moce_cluster_per_layer: false (the default) makes every later MoCE layer keep the first layer's
  // cluster of each token; true lets each layer assign its own from its own input and centroids.
  bool cluster_per_layer = false;
};

std::string to_string(MocePool v);
std::string to_string(SeqClustering v);
std::string to_string(MoceAssign v);

}  // namespace moeforge
