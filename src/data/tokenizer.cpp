#include "moeforge/data/tokenizer.h"
#include "moeforge/data/tokenizer_module.h"

#include <dlfcn.h>

// Whether this file is compiled with AddressSanitizer (gcc defines __SANITIZE_ADDRESS__, clang has the
// feature).
#if defined(__SANITIZE_ADDRESS__)
#define MOEFORGE_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOEFORGE_UNDER_ASAN 1
#endif
#endif
#ifndef MOEFORGE_UNDER_ASAN
#define MOEFORGE_UNDER_ASAN 0
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "moeforge/data/corpus.h"
#include "moeforge/data/random.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "spm_shim/spm_shim.h"

namespace moeforge {
namespace {

// The shim's functions, resolved once. SentencePiece lives in its own module, opened with a private symbol
// scope, because its embedded protobuf clashes with LibTorch's (spm_shim.h says how).
struct Shim {
  decltype(&moeforge_spm_train) train;
  decltype(&moeforge_spm_load) load;
  decltype(&moeforge_spm_release) release;
  decltype(&moeforge_spm_encode) encode;
  decltype(&moeforge_spm_decode) decode;
  decltype(&moeforge_spm_serialize) serialize;
  decltype(&moeforge_spm_info) info;
  decltype(&moeforge_spm_free) free;
};

// The folder of the object this code was linked into: the executable when moeforge is linked statically
// (the CLI, a user's program), found through dladdr rather than /proc/self/exe so that a shared build
// would find its own folder.
std::string own_dir() {
  Dl_info info{};
  if (::dladdr(reinterpret_cast<void*>(&own_dir), &info) != 0 && info.dli_fname != nullptr &&
      info.dli_fname[0] == '/')
    return std::filesystem::path(info.dli_fname).parent_path().string();
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : exe.parent_path().string();
}

}  // namespace

// Defined (weakly) by the source that moeforgeConfig.cmake adds to a program built against the installed
// package: the module in that package's prefix. Absent (null) in the CLI and the build tree.
extern "C" __attribute__((weak)) const char* moeforge_spm_module_hint();

std::vector<std::string> tokenizer_module_candidates() {
  // docs/interop.md, "moeforge as a library": $MOEFORGE_SPM_SHIM; the installed package's module when the
  // program was built against it (moeforge_spm_module_hint); then relative to the binary (an installed
  // prefix's bin/ -> lib/moeforge/, also after the prefix was moved; or beside it, as in the build tree);
  // then the install prefix it was configured for (a user's program linked against the installed package);
  // then the build tree's copy.
  const std::string name = std::filesystem::path(MOEFORGE_SPM_SHIM_PATH).filename().string();
  std::vector<std::string> out;
  if (const char* env = std::getenv("MOEFORGE_SPM_SHIM"); env != nullptr && *env != '\0') out.push_back(env);
  if (moeforge_spm_module_hint != nullptr) out.push_back(moeforge_spm_module_hint());
  const std::string dir = own_dir();
  if (!dir.empty()) {
    out.push_back(
        (std::filesystem::path(dir) / MOEFORGE_SPM_SHIM_REL_DIR / name).lexically_normal().string());
    out.push_back(dir + "/" + name);
  }
  out.push_back(std::string(MOEFORGE_SPM_SHIM_INSTALL_DIR) + "/" + name);
  out.push_back(MOEFORGE_SPM_SHIM_PATH);
  return out;
}

namespace {

struct LoadedShim {
  std::string path;
  void* handle = nullptr;
};

const LoadedShim& loaded_shim() {
  static const LoadedShim s = [] {
    const std::vector<std::string> candidates = tokenizer_module_candidates();
    LoadedShim out;
    std::string tried;
    for (const auto& path : candidates) {
      // A candidate that does not exist is skipped silently; one that exists but fails to load is named.
      std::error_code ec;
      if (!std::filesystem::exists(path, ec)) {
        tried += "\n  " + path + ": no such file";
        continue;
      }
#if MOEFORGE_UNDER_ASAN
      // AddressSanitizer refuses RTLD_DEEPBIND; a link namespace of its own (with its own libc and
      // libstdc++, so the module's allocations never meet ASan's) isolates the module at least as well.
      // docs/reliability.md, "Sanitizers".
      out.handle = ::dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
#else
      out.handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
#endif
      if (out.handle) {
        out.path = path;
        break;
      }
      tried += "\n  " + path + ": " + ::dlerror();
    }
    if (!out.handle)
      throw std::runtime_error(
          "cannot load the SentencePiece shim module (build target moeforge_spm, or set "
          "MOEFORGE_SPM_SHIM):" +
          tried);
    return out;  // the module stays loaded for the life of the process
  }();
  return s;
}

}  // namespace

std::string tokenizer_module_path() {
  return loaded_shim().path;
}

namespace {

const Shim& shim() {
  static const Shim s = [] {
    void* handle = loaded_shim().handle;
    auto sym = [handle](const char* name) {
      void* f = ::dlsym(handle, name);
      if (!f) throw std::runtime_error(std::string("SentencePiece shim lacks ") + name);
      return f;
    };
    Shim out;
    out.train = reinterpret_cast<decltype(out.train)>(sym("moeforge_spm_train"));
    out.load = reinterpret_cast<decltype(out.load)>(sym("moeforge_spm_load"));
    out.release = reinterpret_cast<decltype(out.release)>(sym("moeforge_spm_release"));
    out.encode = reinterpret_cast<decltype(out.encode)>(sym("moeforge_spm_encode"));
    out.decode = reinterpret_cast<decltype(out.decode)>(sym("moeforge_spm_decode"));
    out.serialize = reinterpret_cast<decltype(out.serialize)>(sym("moeforge_spm_serialize"));
    out.info = reinterpret_cast<decltype(out.info)>(sym("moeforge_spm_info"));
    out.free = reinterpret_cast<decltype(out.free)>(sym("moeforge_spm_free"));
    return out;
  }();
  return s;
}

// Takes ownership of a shim-allocated error message and turns it into a string.
std::string take_error(char* error) {
  std::string message = error ? error : "unknown error";
  shim().free(error);
  return message;
}

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

struct Tokenizer::Model {
  void* handle = nullptr;
  int64_t vocab_size = 0, bos_id = -1, eos_id = -1;
  ~Model() {
    if (handle) shim().release(handle);
  }
};

Tokenizer::Tokenizer(std::shared_ptr<const Model> model) : model_(std::move(model)) {}

Tokenizer Tokenizer::train(const std::vector<std::string>& texts, int64_t vocab_size, uint64_t seed,
                           bool byte_fallback) {
  if (vocab_size < 4) throw std::invalid_argument("Tokenizer::train: vocab_size must be >= 4");
  std::vector<const char*> data;
  std::vector<size_t> lengths;
  for (const auto& t : texts) {
    data.push_back(t.data());
    lengths.push_back(t.size());
  }
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  char* proto = nullptr;
  size_t proto_len = 0;
  char* error = nullptr;
  if (shim().train(data.data(), lengths.data(), data.size(), vocab_size, seed, threads, byte_fallback ? 1 : 0,
                   &proto, &proto_len, &error))
    throw std::runtime_error("SentencePiece training failed (vocab_size " + std::to_string(vocab_size) +
                             "): " + take_error(error));
  std::string bytes(proto, proto_len);
  shim().free(proto);
  return from_serialized(bytes);
}

Tokenizer Tokenizer::from_serialized(const std::string& model_proto) {
  auto model = std::make_shared<Model>();
  char* error = nullptr;
  if (shim().load(model_proto.data(), model_proto.size(), &model->handle, &error))
    throw std::invalid_argument("not a SentencePiece model: " + take_error(error));
  shim().info(model->handle, &model->vocab_size, &model->bos_id, &model->eos_id);
  return Tokenizer(std::move(model));
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "cannot open tokenizer model for reading");
  std::ostringstream os;
  os << in.rdbuf();
  try {
    return from_serialized(os.str());
  } catch (const std::invalid_argument& e) {
    throw FileError(path, e.what());
  }
}

void Tokenizer::save(const std::string& path) const {
  write_file_atomic(path, serialized());
}

std::string Tokenizer::serialized() const {
  char* proto = nullptr;
  size_t len = 0;
  char* error = nullptr;
  if (shim().serialize(model_->handle, &proto, &len, &error))
    throw std::runtime_error("SentencePiece serialization failed: " + take_error(error));
  std::string out(proto, len);
  shim().free(proto);
  return out;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  int32_t* ids = nullptr;
  size_t n = 0;
  char* error = nullptr;
  if (shim().encode(model_->handle, text.data(), text.size(), &ids, &n, &error))
    throw std::runtime_error("SentencePiece encode failed: " + take_error(error));
  std::vector<int64_t> out(ids, ids + n);
  shim().free(ids);
  return out;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  const int64_t n = vocab_size();
  std::vector<int32_t> ids32;
  ids32.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= n)
      throw std::out_of_range("Tokenizer::decode: id " + std::to_string(ids[i]) + " at position " +
                              std::to_string(i) + " is outside the vocabulary [0, " + std::to_string(n) +
                              ")");
    ids32.push_back(static_cast<int32_t>(ids[i]));
  }
  char* text = nullptr;
  size_t len = 0;
  char* error = nullptr;
  if (shim().decode(model_->handle, ids32.data(), ids32.size(), &text, &len, &error))
    throw std::runtime_error("SentencePiece decode failed: " + take_error(error));
  std::string out(text, len);
  shim().free(text);
  return out;
}

int64_t Tokenizer::vocab_size() const {
  return model_->vocab_size;
}
int64_t Tokenizer::bos_id() const {
  return model_->bos_id;
}
int64_t Tokenizer::eos_id() const {
  return model_->eos_id;
}

Tokenizer train_or_load_tokenizer(const CorpusSplit& split, const DataConfig& cfg,
                                  const std::string& cache_dir) {
  // The key covers everything the model depends on; hashing the texts (~6 MB for Brown) takes ~10 ms and
  // catches an edited corpus that kept its file names.
  uint64_t key = fnv1a64(cfg.corpus);
  for (const auto& d : split.train) {
    key = fnv1a64(d.id, fnv1a64(std::string(1, '\0'), key));
    key = fnv1a64(d.text, fnv1a64(std::string(1, '\0'), key));
  }
  key = fnv1a64(std::to_string(cfg.vocab_size) + "/" + std::to_string(cfg.seed), key);
  if (cfg.byte_fallback) key = fnv1a64("/byte_fallback", key);  // unchanged keys for existing caches
  if (!split.tokenizer_extra.empty()) {  // likewise: only the instruct corpus has extra texts
    key = fnv1a64("/extra", key);
    for (const auto& t : split.tokenizer_extra) key = fnv1a64(t, fnv1a64(std::string(1, '\0'), key));
  }
  const std::filesystem::path path =
      std::filesystem::path(cache_dir) / ("tokenizer-" + hex64(key) + ".model");

  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    try {
      Tokenizer tok = Tokenizer::load(path.string());
      if (tok.vocab_size() == cfg.vocab_size) return tok;
    } catch (const FileError&) {
      // A damaged cache entry (an interrupted copy, say) is rebuilt below.
    }
  }
  std::vector<std::string> texts;
  texts.reserve(split.train.size() + split.tokenizer_extra.size());
  for (const auto& d : split.train) texts.push_back(d.text);
  texts.insert(texts.end(), split.tokenizer_extra.begin(), split.tokenizer_extra.end());
  Tokenizer tok = Tokenizer::train(texts, cfg.vocab_size, static_cast<uint64_t>(cfg.seed), cfg.byte_fallback);
  std::filesystem::create_directories(cache_dir, ec);
  if (ec) throw FileError(cache_dir, "cannot create the tokenizer cache folder: " + ec.message());
  tok.save(path.string());
  return tok;
}

}  // namespace moeforge
