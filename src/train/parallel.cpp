// A training run over the ranks of a process group (parallel.h, docs/distributed.md).
#include "moeforge/train/parallel.h"

#include "moeforge/dist/dist.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/util/error.h"

namespace moeforge {

// Rows [r*b, (r+1)*b) of a global batch of W*b sequences: this rank's contiguous slice (data
// parallelism, docs/distributed.md), rank 0 first, so the ranks' slices in rank order are the batch.
Batcher::Batch rank_slice(const Batcher::Batch& g, int rank, int world) {
  if (world == 1) return g;
  const int64_t b = g.tokens.size(0) / world;
  auto cut = [&](const torch::Tensor& t) { return t.defined() ? t.narrow(0, b * rank, b) : t; };
  return {cut(g.tokens), cut(g.domain), cut(g.doc), cut(g.weight), cut(g.prompt_len)};
}

ExpertSharding expert_sharding(TransformerLM& model, int64_t n_expert) {
  ExpertSharding s;
  s.n_expert = n_expert;
  for (auto& m : model->named_modules()) {
    auto* layer = dynamic_cast<MoELayerImpl*>(m.value().get());
    if (layer == nullptr || !layer->experts_sharded()) continue;
    s.shard = layer->expert_shard();
    for (auto& p : layer->experts->named_parameters())
      s.names.insert((m.key().empty() ? "" : m.key() + ".") + "experts." + p.key());
  }
  return s;
}

// A checkpoint's full tensors [E, ...] of the sharded names cut to this rank's experts (load).
NamedTensors shard_state(const NamedTensors& full, const ExpertSharding& s, const std::string& where) {
  if (!s.on()) return full;
  NamedTensors out;
  for (const auto& [name, t] : full) {
    if (!s.covers(name)) {
      out.push_back({name, t});
      continue;
    }
    if (t.dim() < 1 || t.size(0) != s.n_expert)
      throw FileError(where, "'" + name + "' has " + std::to_string(t.dim() ? t.size(0) : 0) +
                                 " experts, not " + std::to_string(s.n_expert));
    out.push_back({name, t.narrow(0, s.shard.first, s.shard.count).clone()});
  }
  return out;
}

// The shards of the sharded names of this rank's expert group put back together [E, ...], on every rank
// (save; a collective).
NamedTensors gather_state(const NamedTensors& local, const ExpertSharding& s) {
  if (!s.on()) return local;
  NamedTensors out;
  for (const auto& [name, t] : local)
    out.push_back({name, s.covers(name)
                             ? dist::allgather_cat(t, "the expert shard " + name, dist::Group::kExperts)
                             : t});
  return out;
}

}  // namespace moeforge
