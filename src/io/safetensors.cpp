#include "moeforge/io/safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <tuple>

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
  if (in.bad()) throw FileError(path, "read error");
  return parse_safetensors(bytes, path);
}

namespace {

// A JSON value as a non-negative integer that fits int64_t, or a FileError naming `what`.
int64_t json_size(const nlohmann::json& v, const std::string& path, const std::string& what) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > uint64_t(std::numeric_limits<int64_t>::max()))
      throw FileError(path, what + " " + std::to_string(u) + " is too large");
    return int64_t(u);
  }
  if (v.is_number_integer()) {
    const int64_t s = v.get<int64_t>();
    if (s < 0) throw FileError(path, what + " " + std::to_string(s) + " is negative");
    return s;
  }
  throw FileError(path, what + " is not an integer: " + v.dump());
}

struct Entry {
  std::string name;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  int64_t begin = 0, end = 0;
};

}  // namespace

SafeTensors parse_safetensors(const std::string& bytes, const std::string& path) {
  const int64_t file_size = static_cast<int64_t>(bytes.size());
  if (file_size < 8) throw FileError(path, "truncated: " + std::to_string(file_size) + " bytes, no header");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[i]);
  if (header_len > uint64_t(file_size - 8))
    throw FileError(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                              std::to_string(file_size) + " bytes): truncated or not safetensors");
  if (header_len > kMaxSafetensorsHeader)
    throw FileError(path, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                              std::to_string(kMaxSafetensorsHeader) + " bytes");
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

  // Every entry is checked (dtype, shape, byte count against data_offsets, offsets inside the data) before
  // anything is allocated, so a hostile header costs no more memory than the file itself
  // (docs/reliability.md).
  SafeTensors out;
  std::vector<Entry> entries;
  for (auto& [name, entry] : j.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw FileError(path, "__metadata__ is not a JSON object");
      for (auto& [k, v] : entry.items()) out.metadata[k] = v.is_string() ? v.get<std::string>() : v.dump();
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets"))
      throw FileError(path, where + ": entry needs dtype, shape and data_offsets");
    if (!entry["dtype"].is_string()) throw FileError(path, where + ": dtype is not a string");
    const std::string dt = entry["dtype"].get<std::string>();
    auto it =
        std::find_if(dtype_names().begin(), dtype_names().end(), [&](auto& d) { return d.first == dt; });
    if (it == dtype_names().end()) throw FileError(path, where + ": unsupported dtype " + dt);
    Entry e;
    e.name = name;
    e.dtype = it->second;
    if (!entry["shape"].is_array()) throw FileError(path, where + ": shape is not an array");
    if (entry["shape"].size() > kMaxSafetensorsDims)
      throw FileError(path, where + ": " + std::to_string(entry["shape"].size()) + " dimensions (at most " +
                                std::to_string(kMaxSafetensorsDims) + ")");
    // numel and the byte count: each product is checked against INT64_MAX before it is formed.
    const int64_t elem = int64_t(c10::elementSize(e.dtype));
    int64_t numel = 1;
    bool zero = false;
    for (auto& d : entry["shape"]) {
      const int64_t s = json_size(d, path, where + ": dimension");
      e.shape.push_back(s);
      if (s == 0) zero = true;
    }
    for (int64_t s : e.shape) {
      if (zero) break;
      if (numel > std::numeric_limits<int64_t>::max() / elem / s)
        throw FileError(path, where + ": shape " + entry["shape"].dump() + " of " + dt +
                                  " overflows a 64-bit byte count");
      numel *= s;
    }
    if (zero) numel = 0;
    const int64_t nbytes = numel * elem;
    const auto& offs = entry["data_offsets"];
    if (!offs.is_array() || offs.size() != 2)
      throw FileError(path, where + ": data_offsets is not a pair [begin, end]: " + offs.dump());
    e.begin = json_size(offs[0], path, where + ": data_offsets begin");
    e.end = json_size(offs[1], path, where + ": data_offsets end");
    if (e.end < e.begin || e.end > data_size)
      throw FileError(path, where + ": data_offsets [" + std::to_string(e.begin) + ", " +
                                std::to_string(e.end) + "] lie outside the " + std::to_string(data_size) +
                                " data bytes (truncated file?)");
    if (e.end - e.begin != nbytes)
      throw FileError(path, where + ": " + std::to_string(e.end - e.begin) + " bytes for a " + dt +
                                " tensor of shape " + entry["shape"].dump() + " (" + std::to_string(numel) +
                                " elements, " + std::to_string(nbytes) + " bytes expected)");
    entries.push_back(std::move(e));
  }
  // The spec: the data buffer is indexed entirely, without holes or overlaps.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  int64_t covered = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].begin < covered)
      throw FileError(path, "tensor data ranges overlap: tensor '" + entries[i].name + "' starts at byte " +
                                std::to_string(entries[i].begin) + ", inside tensor '" + entries[i - 1].name +
                                "' (ends at " + std::to_string(covered) + ")");
    if (entries[i].begin > covered)
      throw FileError(path, "tensor data has a hole: bytes [" + std::to_string(covered) + ", " +
                                std::to_string(entries[i].begin) + ") before tensor '" + entries[i].name +
                                "' belong to no tensor");
    covered = entries[i].end;
  }
  if (covered != data_size)
    throw FileError(path, std::to_string(data_size - covered) + " trailing data bytes belong to no tensor");
  // Only now, with every size known to fit inside the file, the tensors are allocated (in file order).
  for (auto& e : entries) {
    auto t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype));
    if (e.end > e.begin) std::memcpy(t.data_ptr(), data + e.begin, size_t(e.end - e.begin));
    out.tensors.push_back({e.name, t});
  }
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
