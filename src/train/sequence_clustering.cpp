// Offline sequence clustering, docs/routing.md section 6. See the header for the legend.
#include "moeforge/train/sequence_clustering.h"

#include <stdexcept>

#include "moeforge/data/kmeans.h"
#include "moeforge/data/tfidf.h"
#include "moeforge/util/error.h"

namespace moeforge {

torch::Tensor sequence_representations(TransformerLM& model, const PackedData& data, int64_t batch_size) {
  auto layers = model->moe_layers();
  if (layers.empty())
    throw std::invalid_argument("offline clustering: the model has no MoE layer to pool the input of");
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard ng;
  const int64_t N = data.size(), S = data.seq_len();
  std::vector<torch::Tensor> parts;
  for (int64_t start = 0; start < N; start += batch_size) {
    const int64_t B = std::min(batch_size, N - start);
    auto inputs = data.row_range(start, B).tokens.narrow(1, 0, S);  // [B, S]
    // The router sees exactly this representation when it assigns the sequence: its own, from its plan.
    RouteContext ctx;
    if (data.prompt_len.defined()) ctx.prompt_len = data.prompt_len.narrow(0, start, B);
    auto out = model->forward(inputs, ctx);
    auto repr = layers.front()->router->sequence_representation(out.plans.front());
    if (!repr.defined())
      throw std::invalid_argument("offline clustering: router '" + layers.front()->router->name() +
                                  "' has no sequence representation");
    parts.push_back(repr.to(torch::kCPU, torch::kFloat));  // [B, C]
  }
  if (was_training) model->train();
  return torch::cat(parts, 0);  // [N, C]
}

namespace {

// `data`, or a seeded sample of `cap` of its rows (in their order) read into memory.
PackedData sample_rows(const PackedData& data, int64_t cap, uint64_t seed) {
  if (data.size() <= cap) return data;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto index =
      std::get<0>(torch::randperm(data.size(), gen, torch::kLong).narrow(0, 0, cap).sort());  // [cap]
  const PackedRows r = data.rows(index);
  PackedData s;
  s.tokens = r.tokens;
  s.domain = r.domain;
  s.doc = r.doc;
  s.weight = r.weight;
  s.prompt_len = r.prompt_len;
  s.domains = data.domains;
  return s;
}

}  // namespace

SequenceClusters cluster_sequences(TransformerLM& model, const PackedData& all_rows,
                                   const Router::OfflineClustering& how, int64_t vocab_size, uint64_t seed,
                                   int64_t batch_size) {
  const PackedData data = sample_rows(all_rows, kMaxClusterSequences, seed);
  if (how.method != "hidden" && how.method != "tfidf")
    throw ConfigError(how.key, "\"" + how.method + "\" has no offline clustering step");
  const int64_t n_cluster = how.n_cluster;
  if (n_cluster < 1 || n_cluster > data.size())
    throw ConfigError("moe.n_cluster", "offline clustering needs 1 <= G <= " + std::to_string(data.size()) +
                                           " training sequences, got " + std::to_string(n_cluster));
  KMeansOptions opt;  // 25 iterations, 3 restarts (kmeans.h)
  opt.seed = seed;
  auto raw = sequence_representations(model, data, batch_size);  // [N, C]
  SequenceClusters out;
  // The router clusters in a space centred on a running mean: cluster in a centred space too, and hand it
  // the mean.
  out.mean = raw.mean(0);  // [C]
  auto pooled = raw - out.mean;
  if (how.method == "hidden") {
    auto km = spherical_kmeans(pooled, n_cluster, opt);
    out.assignment = km.assignment;
    out.centroids = km.centroids;  // [G, C]
    out.mean_similarity = km.mean_similarity;
  } else {
    const int64_t N = data.size(), S = data.seq_len();
    std::vector<std::vector<int64_t>> rows(N);
    const bool prompt = data.prompt_len.defined() && how.prompt_only;
    torch::Tensor inputs;  // [chunk, S]: the rows are read a chunk at a time (shards are read on demand)
    const int64_t chunk = 4096;
    for (int64_t i = 0; i < N; ++i) {
      if (i % chunk == 0)
        inputs = data.row_range(i, std::min(chunk, N - i)).tokens.narrow(1, 0, S).contiguous();
      const int64_t* p = inputs.data_ptr<int64_t>() + (i % chunk) * S;
      // With the prompt pool the words of the prompt only: the response must not choose the cluster.
      const int64_t len = prompt ? std::min<int64_t>(S, data.prompt_len[i].item<int64_t>()) : S;
      rows[i].assign(p, p + len);
    }
    auto km = spherical_kmeans(tfidf_embeddings(rows, vocab_size), n_cluster, opt);  // in [N, V]
    out.assignment = km.assignment;
    out.mean_similarity = km.mean_similarity;
    // The router assigns by its hidden input, not by words: its centroid for cluster g is the direction of
    // the mean unit representation of g's sequences.
    auto unit = pooled / pooled.norm(2, {1}, true).clamp_min(1e-12);                          // [N, C]
    auto sum = torch::zeros({n_cluster, pooled.size(1)}).index_add_(0, km.assignment, unit);  // [G, C]
    out.centroids = sum / sum.norm(2, {1}, true).clamp_min(1e-12);
  }
  out.sizes = torch::zeros({n_cluster}, torch::kDouble)
                  .index_add_(0, out.assignment, torch::ones({data.size()}, torch::kDouble));  // [G]
  const int64_t D = int64_t(data.domains.size());
  out.cluster_domain.assign(n_cluster, std::vector<int64_t>(D, 0));
  auto a = out.assignment.contiguous();
  auto d = data.all_domains().to(torch::kCPU).contiguous();
  for (int64_t i = 0; i < data.size(); ++i) {
    const int64_t di = d.data_ptr<int64_t>()[i];
    if (di >= 0 && di < D) ++out.cluster_domain[a.data_ptr<int64_t>()[i]][di];
  }
  return out;
}

void set_router_centroids(TransformerLM& model, const SequenceClusters& clusters, const std::string& key) {
  // Only the first MoE layer assigns clusters; later layers keep its ids (the router's carry).
  auto layers = model->moe_layers();
  if (layers.empty()) throw ConfigError(key, "the model has no MoE layer to give centroids");
  layers.front()->router->set_sequence_centroids(clusters.centroids, clusters.sizes, clusters.mean, key);
}

}  // namespace moeforge
