// The checkpoint policy of a training run (checkpoint_policy.h).
#include "moeforge/train/checkpoint_policy.h"

#include <algorithm>
#include <fstream>
#include <iomanip>
#include <sstream>

#include <nlohmann/json.hpp>

#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/runtime.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {

// --set keys a resumed run may change (docs/reliability.md): how long it runs and how often it logs,
// evaluates and checkpoints; everything else would make the checkpoint's state mean something else.
const std::vector<std::string>& resumable_keys() {
  static const std::vector<std::string> k = {"train.steps", "train.eval_every", "train.eval_batches",
                                             "train.log_every", "train.checkpoint_every",
                                             "train.keep_checkpoints",
                                             // Checkpoints hold float32 master weights whatever the
                                             // products' precision was (docs/performance.md).
                                             "train.precision",
                                             // How the experts are laid out over ranks; checkpoints hold
                                             // every expert whatever it was (docs/distributed.md).
                                             "dist.expert_parallel"};
  return k;
}

std::string resumable_list() {
  std::string list;
  for (auto& k : resumable_keys()) list += (list.empty() ? "" : ", ") + k;
  return list;
}

}  // namespace

std::string step_name(int64_t step) {
  std::ostringstream os;
  os << "step-" << std::setw(6) << std::setfill('0') << step;
  return os.str();
}

void prune_checkpoints(const fs::path& dir, int64_t keep) {
  std::vector<fs::path> steps;
  for (auto& e : fs::directory_iterator(dir))
    if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0 &&
        e.path().filename().string().find(".tmp") == std::string::npos)
      steps.push_back(e.path());
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + size_t(keep) < steps.size(); ++i) fs::remove_all(steps[i]);
}

RunConfig resume_config(const Checkpoint& ckpt, const std::string& dir,
                        const std::vector<std::string>& overrides) {
  const std::string where = dir + "/config.toml";
  for (auto& o : overrides) {
    const std::string key = o.substr(0, o.find('='));
    const auto& ok = resumable_keys();
    if (std::find(ok.begin(), ok.end(), key) == ok.end())
      throw ConfigError(key, "cannot be changed when resuming (--set " + o + "); a resumed run may change " +
                                 resumable_list() + ". Start a new run, or --init from the checkpoint");
  }
  // Read, then the overrides, then validated once: a bad value the overrides set is theirs (ConfigError),
  // any other is the checkpoint's.
  // A config this version wrote that no longer reads was changed after it was written; one another
  // version wrote may mean what this one does not.
  const bool same_version = ckpt.writer == std::string("moeforge ") + moeforge_version();
  auto unreadable = [&](const ConfigError& e) {
    if (same_version)
      return FileError(where, std::string(e.what()) +
                                  " (this checkpoint's config.toml was changed after it was written: restore "
                                  "it; a resumed run changes only " +
                                  resumable_list() + ", with --set; or start a new run with --init " + dir +
                                  ")");
    return FileError(where, "written by " + ckpt.writer + ", not readable by moeforge " + moeforge_version() +
                                ": " + e.what());
  };
  RunConfig cfg;
  ConfigBinder binder;
  bind_run_config(binder, &cfg);
  try {
    binder.apply_text(ckpt.config_toml, where);
  } catch (const ConfigError& e) {
    throw unreadable(e);
  }
  std::vector<std::string> overridden;
  for (auto& o : overrides) {
    binder.apply_override(o);
    overridden.push_back(o.substr(0, o.find('=')));
  }
  try {
    cfg.validate();
  } catch (const ConfigError& e) {
    if (std::find(overridden.begin(), overridden.end(), e.field()) != overridden.end()) throw;
    throw unreadable(e);
  }
  if (cfg.train.steps <= ckpt.step)
    throw ConfigError("train.steps", std::to_string(cfg.train.steps) + " steps: the checkpoint " + dir +
                                         " is at step " + std::to_string(ckpt.step) +
                                         " already; pass --set train.steps=N with N > " +
                                         std::to_string(ckpt.step) + " to train further");
  return cfg;
}

int64_t trainer_counter(const Checkpoint& ckpt, const std::string& dir, const std::string& key) {
  const std::string where = dir + "/trainer.safetensors";
  auto it = ckpt.trainer_meta.find(key);
  if (it == ckpt.trainer_meta.end()) throw FileError(where, "metadata has no '" + key + "'");
  const std::string& v = it->second;
  if (v.empty() || v.size() > 18 || v.find_first_not_of("0123456789") != std::string::npos)
    throw FileError(where, "metadata '" + key + "' = '" + v + "' is not a non-negative integer");
  return std::stoll(v);
}

void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;
    }
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
        j["step"].get<int64_t>() <= step)
      kept += line + "\n";
  }
  in.close();
  write_file_atomic(path, kept);
}

torch::Tensor rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace moeforge
