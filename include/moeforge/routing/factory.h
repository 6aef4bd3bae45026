// One config value picks the router: moe.router.
#pragma once

#include <memory>

#include "moeforge/config/moe_config.h"
#include "moeforge/routing/router.h"

namespace moeforge {

std::shared_ptr<Router> make_router(const MoEConfig& cfg, int64_t d_model);

}  // namespace moeforge
