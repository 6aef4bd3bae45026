// Errors that name the thing and the place: a config field, a file, a flag.
#pragma once

#include <stdexcept>
#include <string>

namespace moeforge {

// A bad configuration value. `field` is the dotted key (e.g. "moe.n_expert_used").
class ConfigError : public std::runtime_error {
 public:
  ConfigError(const std::string& field, const std::string& message)
      : std::runtime_error("config: " + field + ": " + message), field_(field) {}
  const std::string& field() const { return field_; }

 private:
  std::string field_;
};

// A value as an error message shows it: whole when short, else its start and its size (a 50 MB --set value
// is not echoed whole; docs/reliability.md).
inline std::string clipped(const std::string& s, size_t most = 120) {
  if (s.size() <= most) return s;
  return s.substr(0, most) + "... (" + std::to_string(s.size()) + " bytes)";
}

// Throws ConfigError(field, message) unless `ok`: the checks of a config section's validate().
inline void require_config(bool ok, const char* field, const std::string& message) {
  if (!ok) throw ConfigError(field, message);
}

// A file that cannot be read or has the wrong content (checkpoint, corpus, golden data).
class FileError : public std::runtime_error {
 public:
  FileError(const std::string& path, const std::string& message)
      : std::runtime_error(path + ": " + message), path_(path) {}
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace moeforge
