// libFuzzer target: the checkpoint loader (manifest, CRC and size checks, the safetensors files, the config
// and the trainer state) on a folder written from the input (docs/reliability.md).
//
// Input: parts separated by the line "--moeforge-fuzz-file--": manifest.json, model.safetensors,
// trainer.safetensors, config.toml, tokenizer.model, optimizer.safetensors (fewer parts: the rest absent).
// If the first byte is '!', the harness rewrites the manifest's byte counts and CRCs to match the parts
// (when the manifest parses), so that the fuzzer also reaches the parsers behind the checksum.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "fuzz_parts.h"
#include "moeforge/config/run_config.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/load.h"

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const fs::path dir =
      fs::temp_directory_path() / ("moeforge-fuzz-ckpt-" + std::to_string(::getpid()));
  static const char* names[] = {"manifest.json", "model.safetensors", "trainer.safetensors",
                                "config.toml",   "tokenizer.model",   "optimizer.safetensors"};
  std::string in(reinterpret_cast<const char*>(data), size);
  const bool fix = !in.empty() && in[0] == '!';
  if (fix) in.erase(0, 1);
  std::vector<std::string> parts = split_fuzz_parts(in, 6);
  fs::remove_all(dir);
  fs::create_directories(dir);
  if (fix) {
    try {
      auto m = nlohmann::json::parse(parts[0]);
      if (m.is_object()) {
        for (size_t i = 1; i < parts.size(); ++i)
          m["files"][names[i]] = {{"bytes", parts[i].size()}, {"crc32", moeforge::crc32_of(parts[i])}};
        parts[0] = m.dump();
      }
    } catch (const std::exception&) {
    }
  }
  for (size_t i = 0; i < parts.size(); ++i) std::ofstream(dir / names[i], std::ios::binary) << parts[i];
  try {
    auto c = moeforge::load_checkpoint(dir.string());
    // What train --resume and load_model read next: the config and the trainer counters.
    (void)moeforge::load_run_config_text(c.config_toml, "fuzz/config.toml");
  } catch (const std::runtime_error&) {
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
