#include "moeforge/routing/factory.h"

#include "moeforge/routing/registry.h"

namespace moeforge {

std::shared_ptr<Router> make_router(const MoEConfig& cfg, int64_t d_model) {
  return router_spec(cfg.router).make(cfg, d_model);
}

}  // namespace moeforge
