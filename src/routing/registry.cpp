// The router registry (registry.h): the list of rows. Each row is built in its router's own .cpp, so adding
// a router is its own files and one line here (docs/routing.md, "Adding a router").
#include "moeforge/routing/registry.h"

#include <string>

#include "moeforge/routing/bip.h"
#include "moeforge/routing/expert_choice.h"
#include "moeforge/routing/hierarchical.h"
#include "moeforge/routing/loss_free.h"
#include "moeforge/routing/moce.h"
#include "moeforge/routing/topk.h"
#include "moeforge/util/error.h"

namespace moeforge {

const std::vector<RouterSpec>& router_registry() {
  static const std::vector<RouterSpec> kRows = {topk_router_spec(),         expert_choice_router_spec(),
                                                loss_free_router_spec(),    bip_router_spec(),
                                                hierarchical_router_spec(), moce_router_spec()};
  return kRows;
}

void validate_router_keys(const MoEConfig& cfg) {
  const auto& picked = router_spec(cfg.router);
  if (picked.validate) picked.validate(cfg);
  for (const auto& r : router_registry())
    if (r.name != cfg.router && r.validate_unpicked) r.validate_unpicked(cfg);
}

bool router_buffer_may_be_absent(const std::string& name) {
  auto ends_with = [&](const std::string& suffix) {
    return name.size() > suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
           name[name.size() - suffix.size() - 1] == '.';
  };
  if (ends_with("expert_active")) return true;
  for (const auto& r : router_registry())
    for (const auto& b : r.late_buffers)
      if (ends_with(b)) return true;
  return false;
}

std::vector<std::string> router_names() {
  std::vector<std::string> out;
  for (const auto& r : router_registry()) out.push_back(r.name);
  return out;
}

const RouterSpec& router_spec(const std::string& name) {
  std::string all;
  for (const auto& r : router_registry()) {
    if (r.name == name) return r;
    all += (all.empty() ? "" : ", ") + r.name;
  }
  throw ConfigError("moe.router", "unknown router '" + name + "' (expected one of: " + all + ")");
}

}  // namespace moeforge
