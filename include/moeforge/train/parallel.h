// A training run spread over the ranks of a process group (docs/distributed.md): each rank's slice of the
// global batch (data parallelism), and which parameters are this rank's shard of the experts (expert
// parallelism), with the checkpoint state cut to the shard on load and put back together on save.
#pragma once

#include <set>
#include <string>

#include "moeforge/data/batching.h"
#include "moeforge/dist/expert_parallel.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/transformer.h"

namespace moeforge {

// Rows [r*b, (r+1)*b) of a global batch of W*b sequences: this rank's contiguous slice, rank 0 first, so the
// ranks' slices in rank order are the batch.
Batcher::Batch rank_slice(const Batcher::Batch& g, int rank, int world);

// Expert parallelism (docs/distributed.md): the names of the parameters this rank holds a shard of (its
// experts of every MoE layer), and the shard.
struct ExpertSharding {
  std::set<std::string> names;
  dist::ExpertShard shard;
  int64_t n_expert = 0;
  bool on() const { return !names.empty(); }
  // A parameter name, or an optimiser entry "adam.m.<name>" / "adam.v.<name>" of one.
  bool covers(const std::string& key) const {
    if (names.count(key)) return true;
    for (const char* pre : {"adam.m.", "adam.v."})
      if (key.rfind(pre, 0) == 0 && names.count(key.substr(std::string(pre).size()))) return true;
    return false;
  }
};

// The sharded parameters of `model` (MoE layers built while expert groups were set up, dist.h).
ExpertSharding expert_sharding(TransformerLM& model, int64_t n_expert);
// A checkpoint's full tensors [E, ...] of the sharded names cut to this rank's experts (load); others as
// they are. A tensor without n_expert rows is a FileError naming `where`.
NamedTensors shard_state(const NamedTensors& full, const ExpertSharding& s, const std::string& where);
// The shards of the sharded names of this rank's expert group put back together [E, ...], on every rank
// (save; a collective).
NamedTensors gather_state(const NamedTensors& local, const ExpertSharding& s);

}  // namespace moeforge
