// Hugging Face folders (docs/interop.md): a Mixtral-form model (mixtral.h) written as MixtralForCausalLM
// (config.json, model.safetensors or shards + model.safetensors.index.json, tokenizer.model,
// tokenizer_config.json, special_tokens_map.json), and LlamaForCausalLM / MixtralForCausalLM folders read
// back into moeforge checkpoints.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

#include "moeforge/interop/mixtral.h"

namespace moeforge {

struct HfExportOptions {
  std::string dtype = "f32";              // f32 | f16 | bf16
  uint64_t max_shard_bytes = 4ull << 30;  // above this the weights are sharded (HF's index.json)
  double router_aux_loss_coef = 0.0;      // config.json's router_aux_loss_coef (training only)
};

void write_hf(const std::string& dir, const MixtralModel& m, const HfExportOptions& opt = {});

// Reads a Hugging Face folder into a moeforge checkpoint folder `out` (format of checkpoint.h): Llama
// (dense) and Mixtral. bf16 and f16 weights are converted to float32 (exactly: both are subsets of it).
// Throws FileError naming the file and tensor (unknown architecture, missing or misshapen tensor,
// truncated or garbled file).
void import_hf(const std::string& dir, const std::string& out, std::ostream& log);

}  // namespace moeforge
