// One config value picks the router: moe.router. `cfg` is a validated config (MoEConfig::validate, which
// RunConfig::validate runs once per run).
#pragma once

#include <memory>

#include "moeforge/routing/moe_config.h"
#include "moeforge/routing/router.h"

namespace moeforge {

std::shared_ptr<Router> make_router(const MoEConfig& cfg, int64_t d_model);

}  // namespace moeforge
