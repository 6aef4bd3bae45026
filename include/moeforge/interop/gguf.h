// GGUF v3 (ggml's docs/gguf.md): a little-endian file of metadata key/values, tensor descriptors and
// aligned tensor data. moeforge writes the llama architecture with experts (llama.cpp's Mixtral path) from
// the Mixtral form (mixtral.h); docs/interop.md lists every key and conversion.
#pragma once

#include <string>

#include "moeforge/interop/mixtral.h"

namespace moeforge {

enum class GgufDType { kF32, kF16 };

struct GgufExportOptions {
  GgufDType dtype = GgufDType::kF32;  // 2-D weights; norms always stay float32
  // Test-only (negative control): write Q/K rows in moeforge's half-split RoPE order instead of the
  // adjacent pairs llama.cpp rotates.
  bool skip_qk_permutation = false;
  std::string name = "moeforge";  // general.name
};

// The bytes of the GGUF file of `m`.
std::string gguf_bytes(const MixtralModel& m, const GgufExportOptions& opt = {});

// Writes the GGUF file atomically (temporary name, then rename).
void write_gguf(const std::string& path, const MixtralModel& m, const GgufExportOptions& opt = {});

// Rows of a [H*D, C] Q or K weight reordered per head from half-split pairs (i, i + D/2) to adjacent pairs
// (2i, 2i + 1): row h*D + 2i + j of the result is row h*D + j*D/2 + i of w.
torch::Tensor rope_half_to_adjacent_rows(const torch::Tensor& w, int64_t n_head);

}  // namespace moeforge
