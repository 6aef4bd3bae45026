#include "moeforge/model/checkpoint.h"

#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "moeforge/io/safetensors.h"
#include "moeforge/routing/registry.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

constexpr const char* kFormat = "moeforge-checkpoint-1";
#ifndef MOEFORGE_VERSION
#error "MOEFORGE_VERSION must be defined (CMakeLists.txt sets it from the project version)"
#endif

// The files a checkpoint may hold: a manifest can name nothing else, so no name in it reaches outside
// the checkpoint's folder (docs/reliability.md).
const std::vector<std::string>& known_files() {
  static const std::vector<std::string> k = {"model.safetensors", "optimizer.safetensors",
                                             "trainer.safetensors", "config.toml", "tokenizer.model"};
  return k;
}

// Reads `path` whole, after checking that it is a regular file of `expect` bytes (when given), so that a
// manifest's size is compared before anything is read.
std::string read_file(const fs::path& path, std::optional<uint64_t> expect = std::nullopt) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw FileError(path.string(), "missing or not a regular file");
  const uint64_t size = fs::file_size(path, ec);
  if (ec) throw FileError(path.string(), "unreadable: " + ec.message());
  if (expect && size != *expect)
    throw FileError(path.string(), "has " + std::to_string(size) + " bytes, the manifest says " +
                                       std::to_string(*expect) + " (truncated or replaced)");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path.string(), "missing or unreadable");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad() || (expect && bytes.size() != *expect))
    throw FileError(path.string(), "read " + std::to_string(bytes.size()) + " bytes, expected " +
                                       std::to_string(expect.value_or(size)) + " (changed while reading?)");
  return bytes;
}

}  // namespace

const char* moeforge_version() {
  return MOEFORGE_VERSION;
}

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
  // Checkpoints hold float32 master weights; a model stored in bf16 for inference is not one
  // (model/inference_precision.h).
  for (const auto& [name, t] : ckpt.model)
    if (t.scalar_type() == torch::kBFloat16)
      throw std::invalid_argument(
          "checkpoint " + dir + ": weight " + name +
          " is stored in bf16 for inference; checkpoints keep float32 master weights");
  std::map<std::string, std::string> files;
  files["model.safetensors"] = safetensors_bytes(ckpt.model);
  if (!ckpt.optimizer.empty()) files["optimizer.safetensors"] = safetensors_bytes(ckpt.optimizer);
  files["trainer.safetensors"] = safetensors_bytes(ckpt.trainer, ckpt.trainer_meta);
  files["config.toml"] = ckpt.config_toml;
  files["tokenizer.model"] = ckpt.tokenizer_model;
  nlohmann::json manifest = {
      {"format", kFormat}, {"moeforge_version", MOEFORGE_VERSION}, {"step", ckpt.step}};
  for (auto& [name, bytes] : files)
    manifest["files"][name] = {{"bytes", bytes.size()}, {"crc32", crc32_of(bytes)}};

  // docs/reliability.md: every file and the folder fsynced, then the rename, then the parent fsynced, and
  // only then the previous checkpoint removed. A failure leaves the previous checkpoint under `dir` and
  // removes the temporary folder.
  const fs::path final_dir(dir);
  const fs::path parent = final_dir.has_parent_path() ? final_dir.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw FileError(parent.string(), "cannot create the checkpoint's parent folder: " + ec.message());
  const fs::path tmp = final_dir.string() + ".tmp-" + std::to_string(::getpid());
  const fs::path old = final_dir.string() + ".old-" + std::to_string(::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) throw FileError(tmp.string(), "cannot create the temporary checkpoint folder: " + ec.message());
  try {
    for (auto& [name, bytes] : files) write_file_durable((tmp / name).string(), bytes);
    write_file_durable((tmp / "manifest.json").string(),
                       manifest.dump(2) + "\n");  // last: marks completeness
    fsync_dir(tmp.string());
  } catch (const FileError& e) {
    fs::remove_all(tmp, ec);
    throw FileError(dir, std::string("checkpoint not written") +
                             (fs::exists(final_dir) ? " (the one already in this folder is kept)" : "") +
                             ": " + e.what());
  }
  // Replace: the old folder is moved aside only once the new one is complete and durable.
  const bool had_old = fs::exists(final_dir);
  if (had_old) {
    fs::remove_all(old, ec);
    fs::rename(final_dir, old, ec);
    if (ec) {
      fs::remove_all(tmp, ec);
      throw FileError(dir, "cannot move the previous checkpoint aside: " + ec.message());
    }
  }
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    const std::string why = ec.message();
    if (had_old) fs::rename(old, final_dir, ec);
    fs::remove_all(tmp, ec);
    throw FileError(dir, "cannot move the new checkpoint into place: " + why);
  }
  fsync_dir(parent.string());
  if (had_old) {
    fs::remove_all(old, ec);
    fsync_dir(parent.string());
  }
}

std::string resolve_checkpoint_dir(const std::string& dir) {
  const fs::path p(dir);
  if (!fs::exists(p)) throw FileError(dir, "no such checkpoint folder");
  if (fs::exists(p / "manifest.json")) return dir;
  if (fs::exists(p / "latest")) {
    std::string name = read_file(p / "latest");
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
        name.find('\0') != std::string::npos)
      throw FileError((p / "latest").string(),
                      "names '" + name + "', which is not a checkpoint folder inside " + dir);
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
  const std::string mpath = (p / "manifest.json").string();
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(read_file(p / "manifest.json"));
  } catch (const nlohmann::json::exception& e) {
    throw FileError(mpath, std::string("not valid JSON: ") + e.what());
  }
  if (!manifest.is_object()) throw FileError(mpath, "not a JSON object");
  // Which moeforge wrote it: checkpoints from before 0.1.0 recorded none.
  std::string writer = "a moeforge version older than 0.1.0";
  if (manifest.contains("moeforge_version") && manifest["moeforge_version"].is_string())
    writer = "moeforge " + manifest["moeforge_version"].get<std::string>();
  const std::string format = manifest.contains("format") && manifest["format"].is_string()
                                 ? manifest["format"].get<std::string>()
                                 : "";
  if (format != kFormat)
    throw FileError(mpath, "unknown checkpoint format '" + format + "' written by " + writer + " (moeforge " +
                               MOEFORGE_VERSION + " reads " + kFormat + ")");
  if (!manifest.contains("files") || !manifest["files"].is_object())
    throw FileError(mpath, "has no \"files\" object (written by " + writer + ")");
  std::map<std::string, std::string> files;
  for (auto& [name, info] : manifest["files"].items()) {
    const auto& known = known_files();
    if (std::find(known.begin(), known.end(), name) == known.end())
      throw FileError(mpath,
                      "names a file '" + name +
                          "' that is not part of a checkpoint (a checkpoint's files stay in its folder)");
    const fs::path f = p / name;
    if (!info.is_object() || !info.contains("bytes") || !info["bytes"].is_number_unsigned() ||
        !info.contains("crc32") || !info["crc32"].is_number_unsigned() ||
        info["crc32"].get<uint64_t>() > 0xffffffffu)
      throw FileError(mpath, "entry for '" + name + "' needs unsigned \"bytes\" and a 32-bit \"crc32\"");
    std::string bytes = read_file(f, info["bytes"].get<uint64_t>());
    if (crc32_of(bytes) != info["crc32"].get<uint32_t>())
      throw FileError(f.string(), "checksum mismatch: the file is corrupted");
    files[name] = std::move(bytes);
  }
  for (const char* required : {"model.safetensors", "trainer.safetensors", "config.toml", "tokenizer.model"})
    if (!files.count(required))
      throw FileError((p / required).string(), "missing from the checkpoint manifest");
  Checkpoint c;
  if (manifest.contains("step")) {
    if (!manifest["step"].is_number_integer() || manifest["step"].get<int64_t>() < 0)
      throw FileError(mpath, "\"step\" is not a non-negative integer: " + manifest["step"].dump());
    c.step = manifest["step"].get<int64_t>();
  }
  c.writer = writer;
  c.config_toml = files["config.toml"];
  c.tokenizer_model = files["tokenizer.model"];
  if (c.tokenizer_model.empty())
    throw FileError(dir + "/tokenizer.model", "is empty (a checkpoint's SentencePiece model is never empty)");
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

void load_module_state(torch::nn::Module& module, const NamedTensors& state, const std::string& where) {
  std::map<std::string, const torch::Tensor*> given;
  for (auto& s : state) given[s.first] = &s.second;
  torch::NoGradGuard ng;
  for (auto& [name, target] : module_state(module)) {
    auto it = given.find(name);
    // A router buffer that came after the checkpoint was written keeps its initial value (the registry
    // says which: the expert mask of pruning, routers' late additions).
    if (it == given.end() && router_buffer_may_be_absent(name)) continue;
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
