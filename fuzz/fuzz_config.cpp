// libFuzzer target: the TOML run-config binder, file and --set values (docs/reliability.md).
// Input: lines before the first empty line are --set overrides (section.key=value); the rest is the TOML
// file. Errors must be ConfigError / runtime_error naming the key; nothing else may escape.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "moeforge/config/run_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> overrides;
  size_t pos = 0;
  while (pos < in.size()) {
    const size_t nl = in.find('\n', pos);
    if (nl == std::string::npos || nl == pos) break;
    overrides.push_back(in.substr(pos, nl - pos));
    pos = nl + 1;
  }
  const size_t blank = in.find("\n\n");
  const std::string text = blank == std::string::npos ? in : in.substr(blank + 2);
  try {
    auto cfg = moeforge::load_run_config_text(text, "fuzz.toml", overrides);
    (void)moeforge::load_run_config_text(cfg.to_toml(), "fuzz.toml (round trip)");
  } catch (const std::runtime_error&) {
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
