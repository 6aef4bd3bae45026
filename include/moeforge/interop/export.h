// `moeforge export` and `moeforge import`: a checkpoint to GGUF or a Hugging Face folder, and a Hugging
// Face folder to a checkpoint (docs/interop.md).
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

namespace moeforge {

struct ExportOptions {
  std::string checkpoint;        // checkpoint folder (or a run's checkpoints/ folder)
  std::string format;            // "gguf" | "hf"
  std::string out;               // GGUF file, or Hugging Face folder
  std::string dtype = "f32";     // "f32" | "f16" (gguf); "f32" | "f16" | "bf16" (hf)
  uint64_t max_shard_bytes = 0;  // hf: shard above this many bytes (0 = the writer's default, 4 GiB)
};

// Writes the export; lists the conversions applied on `log`. Throws ConfigError / FileError naming the
// option, config key or file.
void export_checkpoint(const ExportOptions& opt, std::ostream& log);

}  // namespace moeforge
