// The whole run configuration: [model], [moe], [train], [data], [dist], each section owned by its room
// (model/, routing/, train/, data/, dist/; docs/architecture.md, "Config sections"). Read from TOML (a
// file, or the embedded configs/default.toml), then `--set section.key=value` overrides; unknown keys and
// bad values are errors that name the key. A config is validated once, where it is read.
#pragma once

#include <string>
#include <vector>

#include "moeforge/config/binder.h"
#include "moeforge/data/data_config.h"
#include "moeforge/dist/dist_config.h"
#include "moeforge/model/model_config.h"
#include "moeforge/routing/moe_config.h"
#include "moeforge/train/train_config.h"

namespace moeforge {

struct RunConfig {
  ModelConfig model;
  MoEConfig moe;
  TrainConfig train;
  DataConfig data;
  DistConfig dist;

  // Every section, then what one section asks of another; ConfigError names the field.
  void validate() const;
  std::string to_toml() const;  // every key, re-readable by load_run_config_text
};

void bind_run_config(ConfigBinder& b, RunConfig* c);

// The embedded default (configs/default.toml at build time).
const std::string& default_config_text();

// Defaults of the structs, then `text` (TOML; `where` names it in errors), then overrides; validated (once).
RunConfig load_run_config_text(const std::string& text, const std::string& where,
                               const std::vector<std::string>& overrides = {});
// The same from a file; an empty path means the embedded default.
RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides = {});

}  // namespace moeforge
