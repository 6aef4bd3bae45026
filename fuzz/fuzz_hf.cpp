// libFuzzer target: the Hugging Face reader behind `moeforge import` (config.json, tokenizer.model, the
// safetensors weights or their shards' index) on a folder written from the input (docs/reliability.md).
//
// Input: parts separated by the line "--moeforge-fuzz-file--": config.json, tokenizer.model,
// model.safetensors, model.safetensors.index.json (fewer parts: the rest absent).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "fuzz_parts.h"
#include "moeforge/interop/hf.h"

namespace fs = std::filesystem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const fs::path dir = fs::temp_directory_path() / ("moeforge-fuzz-hf-" + std::to_string(::getpid()));
  static const char* names[] = {"config.json", "tokenizer.model", "model.safetensors",
                                "model.safetensors.index.json"};
  const std::string in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> parts = split_fuzz_parts(in, 4);
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (size_t i = 0; i < parts.size(); ++i) std::ofstream(dir / names[i], std::ios::binary) << parts[i];
  try {
    (void)moeforge::read_hf(dir.string());
  } catch (const std::runtime_error&) {
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
