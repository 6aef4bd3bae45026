#include "moeforge/model/checkpoint.h"

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moeforge/io/safetensors.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

constexpr const char* kFormat = "moeforge-checkpoint-1";

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path.string(), "missing or unreadable");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.flush();
  if (!out) throw FileError(path.string(), "write failed (disk full?)");
}

}  // namespace

uint32_t crc32_of(const std::string& bytes) {
  uLong crc = crc32(0L, Z_NULL, 0);
  size_t pos = 0;
  while (pos < bytes.size()) {
    const uInt chunk = static_cast<uInt>(std::min<size_t>(bytes.size() - pos, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(bytes.data() + pos), chunk);
    pos += chunk;
  }
  return static_cast<uint32_t>(crc);
}

void save_checkpoint(const std::string& dir, const Checkpoint& ckpt) {
  std::map<std::string, std::string> files;
  files["model.safetensors"] = safetensors_bytes(ckpt.model);
  if (!ckpt.optimizer.empty()) files["optimizer.safetensors"] = safetensors_bytes(ckpt.optimizer);
  files["trainer.safetensors"] = safetensors_bytes(ckpt.trainer, ckpt.trainer_meta);
  files["config.toml"] = ckpt.config_toml;
  files["tokenizer.model"] = ckpt.tokenizer_model;
  nlohmann::json manifest = {{"format", kFormat}, {"step", ckpt.step}};
  for (auto& [name, bytes] : files)
    manifest["files"][name] = {{"bytes", bytes.size()}, {"crc32", crc32_of(bytes)}};

  const fs::path final_dir(dir);
  if (final_dir.has_parent_path()) fs::create_directories(final_dir.parent_path());
  const fs::path tmp = final_dir.string() + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  for (auto& [name, bytes] : files) write_file(tmp / name, bytes);
  write_file(tmp / "manifest.json", manifest.dump(2) + "\n");  // last: its presence marks completeness
  // Replace atomically: the old folder is moved aside only once the new one is complete.
  const fs::path old = final_dir.string() + ".old-" + std::to_string(::getpid());
  std::error_code ec;
  if (fs::exists(final_dir)) fs::rename(final_dir, old);
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    if (fs::exists(old)) fs::rename(old, final_dir);
    throw FileError(dir, "cannot move the new checkpoint into place: " + ec.message());
  }
  fs::remove_all(old);
}

std::string resolve_checkpoint_dir(const std::string& dir) {
  const fs::path p(dir);
  if (!fs::exists(p)) throw FileError(dir, "no such checkpoint folder");
  if (fs::exists(p / "manifest.json")) return dir;
  if (fs::exists(p / "latest")) {
    std::string name = read_file(p / "latest");
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    const fs::path target = p / name;
    if (!fs::exists(target / "manifest.json"))
      throw FileError((p / "latest").string(), "names '" + name + "', which is not a complete checkpoint");
    return target.string();
  }
  throw FileError(dir, "not a checkpoint: no manifest.json (and no 'latest' file naming one)");
}

Checkpoint load_checkpoint(const std::string& dir_in) {
  const std::string dir = resolve_checkpoint_dir(dir_in);
  const fs::path p(dir);
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(read_file(p / "manifest.json"));
  } catch (const nlohmann::json::exception& e) {
    throw FileError((p / "manifest.json").string(), std::string("not valid JSON: ") + e.what());
  }
  if (manifest.value("format", "") != kFormat)
    throw FileError(
        (p / "manifest.json").string(),
        "unknown checkpoint format '" + manifest.value("format", "") + "' (expected " + kFormat + ")");
  std::map<std::string, std::string> files;
  for (auto& [name, info] : manifest["files"].items()) {
    const fs::path f = p / name;
    std::string bytes = read_file(f);
    const uint64_t expect_bytes = info["bytes"].get<uint64_t>();
    if (bytes.size() != expect_bytes)
      throw FileError(f.string(), "has " + std::to_string(bytes.size()) + " bytes, the manifest says " +
                                      std::to_string(expect_bytes) + " (truncated or replaced)");
    if (crc32_of(bytes) != info["crc32"].get<uint32_t>())
      throw FileError(f.string(), "checksum mismatch: the file is corrupted");
    files[name] = std::move(bytes);
  }
  for (const char* required : {"model.safetensors", "trainer.safetensors", "config.toml", "tokenizer.model"})
    if (!files.count(required))
      throw FileError((p / required).string(), "missing from the checkpoint manifest");
  Checkpoint c;
  c.step = manifest.value("step", int64_t{0});
  c.config_toml = files["config.toml"];
  c.tokenizer_model = files["tokenizer.model"];
  c.model = parse_safetensors(files["model.safetensors"], (p / "model.safetensors").string()).tensors;
  if (files.count("optimizer.safetensors"))
    c.optimizer =
        parse_safetensors(files["optimizer.safetensors"], (p / "optimizer.safetensors").string()).tensors;
  auto tr = parse_safetensors(files["trainer.safetensors"], (p / "trainer.safetensors").string());
  c.trainer = tr.tensors;
  c.trainer_meta = tr.metadata;
  return c;
}

NamedTensors module_state(const torch::nn::Module& module) {
  NamedTensors out;
  for (const auto& p : module.named_parameters()) out.push_back({p.key(), p.value()});
  for (const auto& b : module.named_buffers()) out.push_back({b.key(), b.value()});
  return out;
}

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

void load_module_state(torch::nn::Module& module, const NamedTensors& state, const std::string& where) {
  std::map<std::string, const torch::Tensor*> given;
  for (auto& s : state) given[s.first] = &s.second;
  torch::NoGradGuard ng;
  for (auto& [name, target] : module_state(module)) {
    auto it = given.find(name);
    // Checkpoints written before pruning existed have no expert mask: every expert stays routable; those
    // written before MoCE's cluster balance bias (session 4) have none: it starts at 0.
    if (it == given.end() && (ends_with(name, ".expert_active") || ends_with(name, ".cluster_bias")))
      continue;
    if (it == given.end())
      throw FileError(where, "tensor '" + name + "' is missing (model/config mismatch?)");
    const auto& src = *it->second;
    if (src.sizes() != target.sizes())
      throw FileError(where, "tensor '" + name + "' has shape " + c10::str(src.sizes()) +
                                 ", the model expects " + c10::str(target.sizes()));
    if (src.scalar_type() != target.scalar_type())
      throw FileError(where, "tensor '" + name + "' has dtype " +
                                 std::string(c10::toString(src.scalar_type())) + ", the model expects " +
                                 c10::toString(target.scalar_type()));
    const_cast<torch::Tensor&>(target).copy_(src);
    given.erase(it);
  }
  if (!given.empty())
    throw FileError(where, "unexpected tensor '" + given.begin()->first + "' not in the model");
}

}  // namespace moeforge
