// Shard folders (shards.h, docs/data.md "Shards").
#include "moeforge/data/shards.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {

// A file written sequentially with a running CRC-32 and byte count.
struct OutFile {
  std::string path;
  std::FILE* f = nullptr;
  uLong crc = crc32(0L, Z_NULL, 0);
  uint64_t bytes = 0;

  explicit OutFile(std::string p) : path(std::move(p)) {
    f = std::fopen(path.c_str(), "wb");
    if (!f) throw FileError(path, std::string("cannot create: ") + std::strerror(errno));
    std::setvbuf(f, nullptr, _IOFBF, 1 << 20);
  }
  ~OutFile() {
    if (f) std::fclose(f);
  }
  void write(const void* data, size_t n) {
    if (n == 0) return;
    if (std::fwrite(data, 1, n, f) != n)
      throw FileError(path, std::string("write failed (disk full?): ") + std::strerror(errno));
    crc = crc32(crc, static_cast<const Bytef*>(data), uInt(n));
    bytes += n;
  }
  // Flushes, syncs and closes.
  void close() {
    if (!f) return;
    if (std::fflush(f) != 0 || ::fsync(::fileno(f)) != 0)
      throw FileError(path, std::string("write failed (disk full?): ") + std::strerror(errno));
    std::fclose(f);
    f = nullptr;
  }
};

// CRC-32 of a file, read in chunks (bounded memory whatever its size).
uint32_t file_crc32(const std::string& path, uint64_t* bytes) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw FileError(path, "missing or unreadable");
  std::vector<unsigned char> buf(size_t(1) << 20);
  uLong crc = crc32(0L, Z_NULL, 0);
  uint64_t n = 0;
  while (size_t got = std::fread(buf.data(), 1, buf.size(), f)) {
    crc = crc32(crc, buf.data(), uInt(got));
    n += got;
  }
  const bool bad = std::ferror(f);
  std::fclose(f);
  if (bad) throw FileError(path, "read failed");
  *bytes = n;
  return uint32_t(crc);
}

std::string read_small_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "missing or unreadable");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

const std::vector<std::string>& shard_splits() {
  static const std::vector<std::string> k = {"train", "validation", "heldout"};
  return k;
}

// One split being written: its token file, and its offsets and domains in temporary files that finish()
// joins into the index (so nothing grows in memory with the number of documents).
struct ShardWriter::Split {
  std::string name;
  OutFile bin, offsets, domains;
  int64_t docs = 0;
  uint64_t tokens = 0;
  std::vector<unsigned char> buf;
  Split(const std::string& dir, const std::string& n)
      : name(n),
        bin(dir + "/" + n + ".bin"),
        offsets(dir + "/" + n + ".offsets.tmp"),
        domains(dir + "/" + n + ".domains.tmp") {
    const uint64_t zero = 0;
    offsets.write(&zero, sizeof zero);
  }
};

ShardWriter::ShardWriter(const std::string& out_dir, const Tokenizer& tokenizer)
    : out_(out_dir), tok_(tokenizer), width_(tokenizer.vocab_size() <= 65536 ? 2 : 4) {
  std::error_code ec;
  if (fs::exists(out_, ec))
    throw FileError(
        out_, "exists: a shard folder is written whole into a new folder (remove it, or give another --out)");
  // A temporary folder of a tokenize that died (its process is gone) is removed: a rerun starts over.
  const fs::path parent = fs::absolute(out_).parent_path();
  const std::string stem = fs::path(out_).filename().string() + ".tmp-";
  for (auto it = fs::directory_iterator(parent, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(stem, 0) != 0) continue;
    const std::string pid = name.substr(stem.size());
    if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos) continue;
    if (::kill(pid_t(std::stol(pid)), 0) != 0 && errno == ESRCH) {
      std::error_code rm;
      fs::remove_all(it->path(), rm);
    }
  }
  ec.clear();
  tmp_ = out_ + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp_, ec);
  fs::create_directories(tmp_, ec);
  if (ec) throw FileError(tmp_, "cannot create: " + ec.message());
}

ShardWriter::~ShardWriter() {
  splits_.clear();  // closes the files
  if (!finished_) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

int32_t ShardWriter::domain_id(const std::string& name) {
  auto it = std::find(domains_.begin(), domains_.end(), name);
  if (it != domains_.end()) return int32_t(it - domains_.begin());
  domains_.push_back(name);
  return int32_t(domains_.size() - 1);
}

ShardWriter::Split& ShardWriter::split(const std::string& name) {
  for (auto& s : splits_)
    if (s->name == name) return *s;
  if (std::find(shard_splits().begin(), shard_splits().end(), name) == shard_splits().end())
    throw std::invalid_argument("ShardWriter: unknown split '" + name + "'");
  splits_.push_back(std::make_unique<Split>(tmp_, name));
  return *splits_.back();
}

void ShardWriter::add(const std::string& split_name, const std::string& domain,
                      const std::vector<int64_t>& ids) {
  Split& s = split(split_name);
  const int32_t dom = domain_id(domain);
  const size_t n = ids.size() + 2;
  s.buf.resize(n * size_t(width_));
  auto put = [&](size_t i, int64_t id) {
    if (width_ == 2) {
      const uint16_t v = uint16_t(id);
      std::memcpy(&s.buf[i * 2], &v, 2);
    } else {
      const uint32_t v = uint32_t(id);
      std::memcpy(&s.buf[i * 4], &v, 4);
    }
  };
  put(0, tok_.bos_id());
  for (size_t i = 0; i < ids.size(); ++i) put(i + 1, ids[i]);
  put(n - 1, tok_.eos_id());
  s.bin.write(s.buf.data(), s.buf.size());
  s.tokens += n;
  ++s.docs;
  s.offsets.write(&s.tokens, sizeof s.tokens);
  s.domains.write(&dom, sizeof dom);
}

int64_t ShardWriter::documents() const {
  int64_t n = 0;
  for (const auto& s : splits_) n += s->docs;
  return n;
}

uint64_t ShardWriter::tokens() const {
  uint64_t n = 0;
  for (const auto& s : splits_) n += s->tokens;
  return n;
}

nlohmann::json ShardWriter::finish(const nlohmann::json& extra) {
  nlohmann::json files = nlohmann::json::object(), splits = nlohmann::json::object();
  auto record = [&](const std::string& path) {
    uint64_t bytes = 0;
    const uint32_t crc = file_crc32(path, &bytes);
    files[fs::path(path).filename().string()] = {{"bytes", bytes}, {"crc32", crc}};
  };
  for (auto& s : splits_) {
    s->bin.close();
    s->offsets.close();
    s->domains.close();
    // <split>.idx: the offsets, then the domains.
    {
      OutFile idx(tmp_ + "/" + s->name + ".idx");
      std::vector<char> buf(size_t(1) << 20);
      for (const std::string& part : {s->offsets.path, s->domains.path}) {
        std::FILE* in = std::fopen(part.c_str(), "rb");
        if (!in) throw FileError(part, "cannot read back");
        while (size_t got = std::fread(buf.data(), 1, buf.size(), in)) idx.write(buf.data(), got);
        std::fclose(in);
        fs::remove(part);
      }
      idx.close();
    }
    record(s->bin.path);
    record(tmp_ + "/" + s->name + ".idx");
    splits[s->name] = {{"documents", s->docs}, {"tokens", s->tokens}};
  }
  write_file_atomic(tmp_ + "/tokenizer.model", tok_.serialized());
  record(tmp_ + "/tokenizer.model");
  nlohmann::json m = extra;
  m["format"] = kShardFormat;
  m["id_bytes"] = width_;
  m["vocab_size"] = tok_.vocab_size();
  m["domains"] = domains_;
  m["splits"] = splits;
  m["files"] = files;
  write_file_atomic(tmp_ + "/manifest.json", m.dump(2) + "\n");
  std::error_code ec;
  fs::rename(tmp_, out_, ec);
  if (ec) throw FileError(out_, "cannot move the finished shards into place: " + ec.message());
  finished_ = true;
  return m;
}

ShardSplit::ShardSplit(const std::string& bin_path, const std::string& idx_path, int width, int64_t n_docs,
                       uint64_t n_tokens)
    : bin_path_(bin_path), width_(width) {
  // The index: D+1 offsets then D domains, exactly.
  // Read straight into the vectors (no copy of the file in between: 12 bytes a document).
  const size_t want = size_t(n_docs + 1) * 8 + size_t(n_docs) * 4;
  std::error_code ec;
  const uint64_t have = fs::file_size(idx_path, ec);
  if (ec) throw FileError(idx_path, "missing or unreadable");
  if (n_docs < 0 || have != want)
    throw FileError(idx_path, std::to_string(have) + " bytes, the manifest's " + std::to_string(n_docs) +
                                  " documents need " + std::to_string(want));
  offsets_.resize(size_t(n_docs + 1));
  domain_.resize(size_t(n_docs));
  std::ifstream idx(idx_path, std::ios::binary);
  idx.read(reinterpret_cast<char*>(offsets_.data()), std::streamsize(offsets_.size() * 8));
  idx.read(reinterpret_cast<char*>(domain_.data()), std::streamsize(domain_.size() * 4));
  if (!idx) throw FileError(idx_path, "read failed");
  if (offsets_.front() != 0 || offsets_.back() != n_tokens)
    throw FileError(idx_path, "offsets do not span the manifest's " + std::to_string(n_tokens) + " tokens");
  for (size_t d = 0; d + 1 < offsets_.size(); ++d)
    if (offsets_[d + 1] < offsets_[d] + 2)  // every document holds at least <s> and </s>
      throw FileError(idx_path, "document " + std::to_string(d) + " has offsets out of order");
  const int fd = ::open(bin_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FileError(bin_path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  map_bytes_ = size_t(st.st_size);
  if (map_bytes_ != n_tokens * uint64_t(width)) {
    ::close(fd);
    throw FileError(bin_path, std::to_string(map_bytes_) + " bytes, the manifest's " +
                                  std::to_string(n_tokens) + " tokens need " +
                                  std::to_string(n_tokens * uint64_t(width)));
  }
  if (map_bytes_ > 0) {
    void* p = ::mmap(nullptr, map_bytes_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw FileError(bin_path, std::string("cannot map: ") + std::strerror(errno));
    }
    // Windows are read in a random order: no read-ahead.
    ::madvise(p, map_bytes_, MADV_RANDOM);
    map_ = static_cast<const unsigned char*>(p);
  }
  ::close(fd);
}

ShardSplit::~ShardSplit() {
  if (map_) ::munmap(const_cast<unsigned char*>(map_), map_bytes_);
}

void ShardSplit::read(uint64_t begin, int64_t n, int64_t* out) const {
  if (width_ == 2) {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t v;
      std::memcpy(&v, map_ + (begin + uint64_t(i)) * 2, 2);
      out[i] = v;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t v;
      std::memcpy(&v, map_ + (begin + uint64_t(i)) * 4, 4);
      out[i] = v;
    }
  }
  release(begin * uint64_t(width_), (begin + uint64_t(n)) * uint64_t(width_));
}

// Mapped pages that were read count in the process's resident memory until the kernel needs them back: over
// a long run, random windows would touch most of a large shard. They are handed back once copied (the page
// cache keeps them; a later read is a minor fault), so resident memory is a batch's worth, whatever the size
// of the corpus (docs/data.md, "Memory").
// A read fault maps the cached pages around the one it needs as well (Linux's fault-around, 64 KiB by
// default, aligned to 64 KiB, MADV_RANDOM or not), so the whole aligned block around a read is handed back.
void ShardSplit::release(uint64_t from, uint64_t to) const {
  constexpr uint64_t kBlock = uint64_t(64) << 10;  // fault_around_bytes' default; a multiple of the page size
  const uint64_t a = from / kBlock * kBlock,
                 b = std::min<uint64_t>((to + kBlock - 1) / kBlock * kBlock, map_bytes_);
  if (map_ && b > a) ::madvise(const_cast<unsigned char*>(map_) + a, size_t(b - a), MADV_DONTNEED);
}

uint32_t ShardSplit::max_id() const {
  uint32_t m = 0;
  const uint64_t n = n_tokens(), chunk = uint64_t(1) << 24;  // tokens; released a chunk at a time
  for (uint64_t at = 0; at < n; at += chunk) {
    const uint64_t end = std::min(n, at + chunk);
    for (uint64_t i = at; i < end; ++i) {
      uint32_t v = 0;
      std::memcpy(&v, map_ + i * uint64_t(width_), size_t(width_));  // little-endian: the low bytes
      m = std::max(m, v);
    }
    release(at * uint64_t(width_), end * uint64_t(width_));
  }
  return m;
}

void ShardSplit::remap_domains(const std::vector<int32_t>& to) {
  for (auto& d : domain_) d = to[size_t(d)];
}

ShardSet open_shards(const std::string& dir) {
  ShardSet s;
  s.dir = dir;
  const std::string mpath = dir + "/manifest.json";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw FileError(dir, "no such shard folder (moeforge tokenize writes one)");
  try {
    s.manifest = nlohmann::json::parse(read_small_file(mpath));
  } catch (const nlohmann::json::exception& e) {
    throw FileError(mpath, std::string("not valid JSON: ") + e.what());
  }
  const auto& m = s.manifest;
  if (!m.is_object() || m.value("format", "") != kShardFormat)
    throw FileError(mpath, "not a shard folder of format " + std::string(kShardFormat));
  const int width = m.value("id_bytes", 0);
  if (width != 2 && width != 4) throw FileError(mpath, "id_bytes must be 2 or 4");
  if (!m.contains("files") || !m["files"].is_object() || !m.contains("domains") || !m["domains"].is_array() ||
      !m.contains("splits") || !m["splits"].is_object())
    throw FileError(mpath, "has no files, domains or splits");
  // Every file the manifest names, whole and unchanged.
  for (auto& [name, f] : m["files"].items()) {
    if (name.find('/') != std::string::npos || name == ".." || name == ".")
      throw FileError(mpath, "names a file outside the folder: " + name);
    if (!f.is_object() || !f.contains("bytes") || !f.contains("crc32"))
      throw FileError(mpath, "file entry '" + name + "' has no bytes or crc32");
    uint64_t bytes = 0;
    const uint32_t crc = file_crc32(dir + "/" + name, &bytes);
    if (bytes != f["bytes"].get<uint64_t>())
      throw FileError(dir + "/" + name, std::to_string(bytes) + " bytes, the manifest says " +
                                            std::to_string(f["bytes"].get<uint64_t>()) + " (truncated?)");
    if (crc != f["crc32"].get<uint32_t>()) throw FileError(dir + "/" + name, "checksum mismatch (corrupted)");
  }
  if (!m["files"].contains("tokenizer.model")) throw FileError(mpath, "names no tokenizer.model");
  s.tokenizer_model = read_small_file(dir + "/tokenizer.model");
  std::vector<std::string> written = m["domains"].get<std::vector<std::string>>();
  s.domains = written;
  std::sort(s.domains.begin(), s.domains.end());
  std::vector<int32_t> to(written.size());
  for (size_t i = 0; i < written.size(); ++i)
    to[i] = int32_t(std::find(s.domains.begin(), s.domains.end(), written[i]) - s.domains.begin());
  for (const auto& name : shard_splits()) {
    if (!m["splits"].contains(name)) continue;
    const auto& sp = m["splits"][name];
    if (!m["files"].contains(name + ".bin") || !m["files"].contains(name + ".idx"))
      throw FileError(mpath, "split '" + name + "' has no " + name + ".bin or " + name + ".idx");
    auto split =
        std::make_shared<ShardSplit>(dir + "/" + name + ".bin", dir + "/" + name + ".idx", width,
                                     sp.at("documents").get<int64_t>(), sp.at("tokens").get<uint64_t>());
    for (int64_t d = 0; d < split->n_docs(); ++d)
      if (split->doc_domain(d) < 0 || size_t(split->doc_domain(d)) >= written.size())
        throw FileError(dir + "/" + name + ".idx", "document " + std::to_string(d) + " has no domain");
    split->remap_domains(to);
    (name == "train" ? s.train : name == "validation" ? s.validation : s.heldout) = split;
  }
  return s;
}

ShardWindows::ShardWindows(std::shared_ptr<const ShardSplit> split, int64_t seq_len)
    : split_(std::move(split)), seq_len_(seq_len) {
  if (seq_len < 1) throw std::invalid_argument("ShardWindows: seq_len must be >= 1");
  const int64_t D = split_->n_docs();
  first_.resize(size_t(D + 1));
  first_[0] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const uint64_t len = split_->doc_end(d) - split_->doc_begin(d);
    first_[size_t(d + 1)] = first_[size_t(d)] + (len - 1) / uint64_t(seq_len);
  }
  n_ = int64_t(first_.back());
}

int64_t ShardWindows::doc_of(int64_t window) const {
  // The last document whose first window is <= window (documents without windows share their first).
  return int64_t(std::upper_bound(first_.begin(), first_.end(), uint64_t(window)) - first_.begin()) - 1;
}

int64_t ShardWindows::window_in_doc(int64_t window) const {
  return window - int64_t(first_[size_t(doc_of(window))]);
}

void ShardWindows::rows(const int64_t* index, int64_t n, int64_t* out) const {
  for (int64_t i = 0; i < n; ++i) {
    if (index[i] < 0 || index[i] >= n_) throw std::out_of_range("ShardWindows: window out of range");
    const int64_t d = doc_of(index[i]);
    const uint64_t start =
        split_->doc_begin(d) + uint64_t(index[i] - int64_t(first_[size_t(d)])) * uint64_t(seq_len_);
    split_->read(start, seq_len_ + 1, out + i * (seq_len_ + 1));
  }
}

std::vector<int64_t> ShardWindows::interleaved_order() const {
  std::vector<int64_t> order;
  order.reserve(size_t(n_));
  std::vector<int64_t> alive;
  for (int64_t d = 0; d + 1 < int64_t(first_.size()); ++d)
    if (first_[size_t(d + 1)] > first_[size_t(d)]) alive.push_back(d);
  for (uint64_t j = 0; !alive.empty(); ++j) {
    std::vector<int64_t> next;
    for (int64_t d : alive) {
      order.push_back(int64_t(first_[size_t(d)] + j));
      if (first_[size_t(d + 1)] - first_[size_t(d)] > j + 1) next.push_back(d);
    }
    alive.swap(next);
  }
  return order;
}

}  // namespace moeforge
