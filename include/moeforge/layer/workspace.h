// Reused scratch buffers of one layer. Fresh large allocations are served by mmap and cost a page fault
// per 4 KiB on first touch, which on the MoE layer cost more than all the routing (docs/performance.md); a
// layer therefore keeps its intermediates from one call to the next.
#pragma once

#include <torch/torch.h>

#include <string>
#include <unordered_map>

namespace moeforge {

class Workspace {
 public:
  // An uninitialised tensor of `shape` and `options` that no one else holds: the buffer cached under
  // `key` when nothing else references it any more (e.g. autograd released the graph that saved it),
  // otherwise a new one, which replaces it in the cache.
  torch::Tensor get(const std::string& key, at::IntArrayRef shape, const torch::TensorOptions& options);
  void clear() { slots_.clear(); }
  int64_t bytes() const;  // memory held by the cache

 private:
  std::unordered_map<std::string, torch::Tensor> slots_;  // flat 1-D buffers
};

}  // namespace moeforge
