// GGUF v3 (ggml's docs/gguf.md): a little-endian file of metadata key/values, tensor descriptors and
// aligned tensor data. moeforge writes the llama architecture with experts (llama.cpp's Mixtral path) from
// the Mixtral form, or llama.cpp's deepseek architecture from the deepseek form (mixtral.h);
// docs/interop.md lists every key and conversion.
#pragma once

#include <string>

#include "moeforge/interop/mixtral.h"

namespace moeforge {

#include <cstdint>
#include <vector>

// Q8_0: ggml's blocks of 32 weights along ne[0], each an f16 scale d = max|x| / 127 and 32 int8 q = round(x /
// d).
// BF16: ggml's type 30, the upper half of each float32 rounded to nearest even (as `generate --dtype bf16`
// stores its weights).
enum class GgufDType { kF32, kF16, kBF16, kQ8_0 };

struct GgufExportOptions {
  GgufDType dtype = GgufDType::kF32;  // 2-D weights; norms always stay float32
  // Test-only (negative control): write Q/K rows in moeforge's half-split RoPE order instead of the
  // adjacent pairs llama.cpp rotates.
  bool skip_qk_permutation = false;
  std::string name = "moeforge";  // general.name
  // When set, gets one line per conversion the writer made (e.g. a q8_0 tensor kept f16).
  std::vector<std::string>* notes = nullptr;
};

// Q8_0 blocks of a float tensor whose last dimension is a multiple of 32 (ggml's reference quantiser,
// quantize_row_q8_0_ref), and back: what llama.cpp computes with.
std::string quantize_q8_0(const torch::Tensor& t);
torch::Tensor dequantize_q8_0(const std::string& blocks, std::vector<int64_t> sizes);

// The bytes of the GGUF file of `m`.
std::string gguf_bytes(const MixtralModel& m, const GgufExportOptions& opt = {});

// Writes the GGUF file atomically (temporary name, then rename).
void write_gguf(const std::string& path, const MixtralModel& m, const GgufExportOptions& opt = {});

// Rows of a [H*D, C] Q or K weight reordered per head from half-split pairs (i, i + D/2) to adjacent pairs
// (2i, 2i + 1): row h*D + 2i + j of the result is row h*D + j*D/2 + i of w.
torch::Tensor rope_half_to_adjacent_rows(const torch::Tensor& w, int64_t n_head);

}  // namespace moeforge
