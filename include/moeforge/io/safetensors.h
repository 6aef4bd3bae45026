// The safetensors format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length,
// a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then raw tensor bytes.
// Files written here load in PyTorch / Hugging Face tools unchanged.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moeforge {

struct SafeTensors {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;  // in file order
  std::map<std::string, std::string> metadata;

  const torch::Tensor& at(const std::string& name) const;  // throws naming the missing tensor
  bool contains(const std::string& name) const;
};

// Limits for hostile files (docs/reliability.md): the JSON header is at most 100 MB (the limit of the
// reference implementation), a tensor has at most 64 dimensions.
constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;
constexpr size_t kMaxSafetensorsDims = 64;

// Reads and validates a whole file: header length bounded and inside the file, header JSON, dtypes, every
// shape's element and byte count computed with overflow checks and equal to its data_offsets, offsets
// inside the data, the data covered without overlaps or holes (as the spec requires). Nothing is
// allocated before every entry passed. Throws FileError naming the path and the offending tensor.
SafeTensors read_safetensors(const std::string& path);

// The bytes of a safetensors file, and their parse (`where` names the source in errors).
std::string safetensors_bytes(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});
SafeTensors parse_safetensors(const std::string& bytes, const std::string& where);

// Writes CPU copies of `tensors` atomically (temporary name, then rename).
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moeforge
