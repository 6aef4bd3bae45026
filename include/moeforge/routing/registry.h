// The router registry: one row per router holds everything the rest of moeforge knows about it (its name,
// its factory, its own config keys with their checks, and the setting that gives it the same active expert
// compute as top-K). Config binding, validation, the factory, `compare`, `bench` and the contract tests look
// routers up here; nothing outside src/routing names a router or casts to one. Each row is built in its
// router's own .cpp (`<name>_router_spec()`, declared in its header); registry.cpp lists them. What a router
// computes about itself (causality, the scores its assignments are measured against, its state) is on the
// Router interface (router.h). How to add a router: docs/routing.md, "Adding a router".
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moeforge {

struct MoEConfig;
class ConfigBinder;
class Router;

struct RouterSpec {
  std::string name;     // the moe.router value
  std::string summary;  // one line: what it is and where it comes from
  // Builds the router for a validated config (cfg.router == name).
  std::function<std::shared_ptr<Router>(const MoEConfig& cfg, int64_t d_model)> make;
  // Its own [moe] keys, bound under "moe.<key>" for every config (so files, --set and to_toml see them
  // whichever router is picked); may be empty.
  std::function<void(ConfigBinder& binder, MoEConfig* cfg)> bind;
  // Checks of its keys when it is the router picked (throws ConfigError naming the key); may be empty.
  std::function<void(const MoEConfig& cfg)> validate;
  // Checks of its keys when another router is picked: a key that means something to this router only
  // must be left at its default (throws ConfigError naming the key); may be empty.
  std::function<void(const MoEConfig& cfg)> validate_unpicked;
  // When the picked router's setting needs one prompt per sequence row (RouteContext::prompt_len; data
  // with one instruction sample per sequence): the key that asks for it and what it does with it; {}
  // otherwise. RunConfig::validate checks the data section against it. May be empty.
  std::function<std::pair<std::string, std::string>(const MoEConfig& cfg)> prompt_rows;
  // Its buffers that checkpoints written before they existed lack; such a checkpoint loads with the
  // buffer at its initial value.
  std::vector<std::string> late_buffers;
  // Sets cfg (a copy whose router is this one) so that every token gets on average the same number of
  // expert assignments as top-K with K = cfg.n_expert_used at the same expert width; returns how, in words
  // ("capacity factor 2"). Throws ConfigError when that K cannot be matched.
  std::function<std::string(MoEConfig& cfg)> equal_compute;
};

// Every router of this build, in a fixed order (the order compare runs them in).
const std::vector<RouterSpec>& router_registry();
// The row of `name`; ConfigError("moe.router") listing the known names when there is none.
const RouterSpec& router_spec(const std::string& name);
std::vector<std::string> router_names();
// The checks of the picked router's row, and every other row's validate_unpicked (MoEConfig::validate).
void validate_router_keys(const MoEConfig& cfg);
// Whether a checkpoint may lack the module state `name` because it is a router buffer that came after it:
// every router's "expert_active" (pruning: all experts stay routable) and each row's late_buffers.
bool router_buffer_may_be_absent(const std::string& name);

}  // namespace moeforge
