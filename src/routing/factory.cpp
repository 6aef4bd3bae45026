#include "moeforge/routing/factory.h"

#include "moeforge/routing/bip.h"
#include "moeforge/routing/expert_choice.h"
#include "moeforge/routing/hierarchical.h"
#include "moeforge/routing/loss_free.h"
#include "moeforge/routing/moce.h"
#include "moeforge/routing/topk.h"
#include "moeforge/util/error.h"

namespace moeforge {

std::shared_ptr<Router> make_router(const MoEConfig& cfg, int64_t d_model) {
  cfg.validate();
  if (cfg.router == "topk") return std::make_shared<TopKRouterImpl>(cfg, d_model);
  if (cfg.router == "hierarchical") return std::make_shared<HierarchicalRouterImpl>(cfg, d_model);
  if (cfg.router == "moce") return std::make_shared<MoCERouterImpl>(cfg, d_model);
  if (cfg.router == "expert_choice") return std::make_shared<ExpertChoiceRouterImpl>(cfg, d_model);
  if (cfg.router == "loss_free") return std::make_shared<LossFreeRouterImpl>(cfg, d_model);
  if (cfg.router == "bip") return std::make_shared<BipRouterImpl>(cfg, d_model);
  throw ConfigError("moe.router", "router '" + cfg.router + "' is not available in this build");
}

}  // namespace moeforge
