#include "moeforge/layer/workspace.h"

namespace moeforge {

torch::Tensor Workspace::get(const std::string& key, at::IntArrayRef shape,
                             const torch::TensorOptions& options) {
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  auto it = slots_.find(key);
  // use_count of the storage counts every tensor and view on it: 1 means only this cache holds it.
  const bool reusable = it != slots_.end() && it->second.storage().use_count() == 1 &&
                        it->second.dtype() == options.dtype() && it->second.device() == options.device() &&
                        it->second.numel() >= numel;
  if (!reusable) {
    auto fresh = torch::empty({numel}, options);
    if (it == slots_.end())
      slots_.emplace(key, fresh);
    else
      it->second = fresh;
    return fresh.view(shape);
  }
  return it->second.narrow(0, 0, numel).view(shape);
}

int64_t Workspace::bytes() const {
  int64_t total = 0;
  for (const auto& kv : slots_) total += kv.second.numel() * static_cast<int64_t>(kv.second.element_size());
  return total;
}

}  // namespace moeforge
