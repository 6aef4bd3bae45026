// Checkpoints: a folder with
//   model.safetensors      every parameter and buffer of the model (router state included), by name
//   optimizer.safetensors  optimiser state (may be absent in an inference-only checkpoint)
//   trainer.safetensors    RNG state, and trainer counters in its metadata
//   config.toml            the resolved run configuration
//   tokenizer.model        the SentencePiece model
//   manifest.json          format, the moeforge version that wrote it, step, and size + CRC-32 of every
//                          file above (no other names: nothing a manifest names leaves the folder)
// A checkpoint is written into a temporary folder beside its final name, fsynced and renamed into place,
// so a crash, power cut or full disk mid-write leaves the previous checkpoint untouched; loading checks
// every file against the manifest before parsing it (docs/reliability.md).
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moeforge {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct Checkpoint {
  int64_t step = 0;
  std::string writer;  // on load: "moeforge X.Y.Z" (or older), for errors about the checkpoint's content
  std::string config_toml;
  std::string tokenizer_model;  // serialized SentencePiece model
  NamedTensors model;
  NamedTensors optimizer;
  NamedTensors trainer;
  std::map<std::string, std::string> trainer_meta;
};

// Writes `ckpt` to `dir` atomically (see above). An existing `dir` is replaced only once the new one is
// complete.
void save_checkpoint(const std::string& dir, const Checkpoint& ckpt);

// Reads and verifies a checkpoint folder. Throws FileError naming the file and what is wrong (missing,
// truncated, checksum mismatch, unreadable tensors).
Checkpoint load_checkpoint(const std::string& dir);

// Resolves DIR to a checkpoint folder: DIR itself if it has a manifest, else the one named in DIR/latest.
std::string resolve_checkpoint_dir(const std::string& dir);

// The model's parameters and buffers by name.
NamedTensors module_state(const torch::nn::Module& module);

// Copies `state` into the module's parameters and buffers. Every name must match, with the same shape and
// dtype; otherwise FileError(where, ...) names the first mismatch (missing, unexpected, shape, dtype).
void load_module_state(torch::nn::Module& module, const NamedTensors& state, const std::string& where);

// This build's version (the project version in CMakeLists.txt), recorded in every checkpoint.
const char* moeforge_version();

// CRC-32 (zlib) of a byte string.
uint32_t crc32_of(const std::string& bytes);

}  // namespace moeforge
