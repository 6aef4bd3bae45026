// Hugging Face folders (docs/interop.md): a Mixtral-form model (mixtral.h) written as MixtralForCausalLM
// (config.json, model.safetensors or shards + model.safetensors.index.json, tokenizer.model,
// tokenizer_config.json, special_tokens_map.json), and LlamaForCausalLM / MixtralForCausalLM folders read
// back into moeforge checkpoints.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

#include "moeforge/config/run_config.h"
#include "moeforge/interop/mixtral.h"

namespace moeforge {

struct HfExportOptions {
  std::string dtype = "f32";              // f32 | f16 | bf16
  uint64_t max_shard_bytes = 4ull << 30;  // above this the weights are sharded (HF's index.json)
  double router_aux_loss_coef = 0.0;      // config.json's router_aux_loss_coef (training only)
};

void write_hf(const std::string& dir, const MixtralModel& m, const HfExportOptions& opt = {});

// A Hugging Face folder as read, before any moeforge model exists: the Mixtral form (weights converted to
// float32), the architecture and the moeforge configuration that computes the same (validated).
struct HfModel {
  MixtralModel model;
  std::string type;  // config.json's model_type: "llama", "mixtral" or "qwen2_moe"
  bool moe = false, tied = false;
  RunConfig cfg;
};

// Reads and checks everything in `dir` (config.json, tokenizer.model, model.safetensors or shards): every
// error is a FileError naming the file and the key or tensor. The fuzz target fuzz_hf runs this.
HfModel read_hf(const std::string& dir);

// Reads a Hugging Face folder into a moeforge checkpoint folder `out` (format of checkpoint.h): Llama
// (dense) and Mixtral. bf16 and f16 weights are converted to float32 (exactly: both are subsets of it).
// Throws FileError naming the file and tensor (unknown architecture, missing or misshapen tensor,
// truncated or garbled file).
void import_hf(const std::string& dir, const std::string& out, std::ostream& log);

}  // namespace moeforge
