#include "moeforge/io/safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace moeforge {
namespace {

const std::vector<std::pair<std::string, torch::ScalarType>>& dtype_names() {
  static const std::vector<std::pair<std::string, torch::ScalarType>> k = {
      {"F64", torch::kDouble}, {"F32", torch::kFloat}, {"F16", torch::kHalf},  {"BF16", torch::kBFloat16},
      {"I64", torch::kLong},   {"I32", torch::kInt},   {"I16", torch::kShort}, {"I8", torch::kChar},
      {"U8", torch::kByte},    {"BOOL", torch::kBool},
  };
  return k;
}

std::string dtype_name(torch::ScalarType t) {
  for (auto& d : dtype_names())
    if (d.second == t) return d.first;
  throw std::runtime_error(std::string("safetensors: unsupported dtype ") + c10::toString(t));
}

}  // namespace

const torch::Tensor& SafeTensors::at(const std::string& name) const {
  for (auto& t : tensors)
    if (t.first == name) return t.second;
  throw std::runtime_error("safetensors: no tensor named '" + name + "'");
}

bool SafeTensors::contains(const std::string& name) const {
  return std::any_of(tensors.begin(), tensors.end(), [&](auto& t) { return t.first == name; });
}

SafeTensors read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "cannot open safetensors file");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_safetensors(bytes, path);
}

SafeTensors parse_safetensors(const std::string& bytes, const std::string& path) {
  const int64_t file_size = static_cast<int64_t>(bytes.size());
  if (file_size < 8) throw FileError(path, "truncated: " + std::to_string(file_size) + " bytes, no header");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[i]);
  if (header_len > uint64_t(file_size - 8))
    throw FileError(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                              std::to_string(file_size) + " bytes): truncated or not safetensors");
  const std::string header = bytes.substr(8, header_len);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const std::exception& e) {
    throw FileError(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw FileError(path, "header is not a JSON object");
  const int64_t data_size = file_size - 8 - int64_t(header_len);
  const char* data = bytes.data() + 8 + header_len;

  SafeTensors out;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (auto& [name, entry] : j.items()) {
    if (name == "__metadata__") {
      for (auto& [k, v] : entry.items()) out.metadata[k] = v.is_string() ? v.get<std::string>() : v.dump();
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets"))
      throw FileError(path, where + ": entry needs dtype, shape and data_offsets");
    const std::string dt = entry["dtype"].get<std::string>();
    auto it =
        std::find_if(dtype_names().begin(), dtype_names().end(), [&](auto& d) { return d.first == dt; });
    if (it == dtype_names().end()) throw FileError(path, where + ": unsupported dtype " + dt);
    std::vector<int64_t> shape = entry["shape"].get<std::vector<int64_t>>();
    int64_t numel = 1;
    for (auto s : shape) {
      if (s < 0) throw FileError(path, where + ": negative dimension");
      numel *= s;
    }
    auto offs = entry["data_offsets"].get<std::vector<int64_t>>();
    if (offs.size() != 2 || offs[0] < 0 || offs[1] < offs[0] || offs[1] > data_size)
      throw FileError(path, where + ": data_offsets [" +
                                (offs.size() == 2 ? std::to_string(offs[0]) + ", " + std::to_string(offs[1])
                                                  : std::string("?")) +
                                "] lie outside the " + std::to_string(data_size) +
                                " data bytes (truncated file?)");
    auto t = torch::empty(shape, torch::TensorOptions().dtype(it->second));
    const int64_t nbytes = numel * int64_t(t.element_size());
    if (offs[1] - offs[0] != nbytes)
      throw FileError(path, where + ": " + std::to_string(offs[1] - offs[0]) + " bytes for a " + dt +
                                " tensor of " + std::to_string(numel) + " elements (" +
                                std::to_string(nbytes) + " expected)");
    if (nbytes > 0) std::memcpy(t.data_ptr(), data + offs[0], size_t(nbytes));
    ranges.push_back({offs[0], offs[1]});
    out.tensors.push_back({name, t});
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) throw FileError(path, "tensor data ranges overlap");
  // Keep file order (by offset) for a stable listing.
  std::sort(out.tensors.begin(), out.tensors.end(), [&](auto& a, auto& b) {
    return j[a.first]["data_offsets"][0].template get<int64_t>() <
           j[b.first]["data_offsets"][0].template get<int64_t>();
  });
  return out;
}

std::string safetensors_bytes(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> cpu;
  int64_t offset = 0;
  for (auto& [name, t] : tensors) {
    auto c = t.detach().to(torch::kCPU).contiguous();
    const int64_t nbytes = c.numel() * int64_t(c.element_size());
    header[name] = {{"dtype", dtype_name(c.scalar_type())},
                    {"shape", c.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    cpu.push_back(c);
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // align data to 8 bytes
  std::string out;
  uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((len >> (8 * i)) & 0xff));
  out += h;
  for (auto& c : cpu)
    out.append(static_cast<const char*>(c.data_ptr()), size_t(c.numel() * c.element_size()));
  return out;
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, safetensors_bytes(tensors, metadata));
}

}  // namespace moeforge
