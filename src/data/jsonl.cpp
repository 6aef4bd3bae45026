// Streaming a user's corpus (jsonl.h, docs/data.md "Your own corpus").
#include "moeforge/data/jsonl.h"

#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

JsonlOptions jsonl_options(const DataConfig& cfg) {
  JsonlOptions o;
  o.text_key = cfg.jsonl_text_key;
  o.domain_key = cfg.jsonl_domain_key;
  o.skip_bad_lines = cfg.bad_lines == "skip";
  return o;
}

// A byte source: plain, gzip (zlib's gzread, which also reads concatenated members) or zstd (streaming).
struct LineReader::Source {
  enum class Kind { kPlain, kGzip, kZstd } kind = Kind::kPlain;
  std::FILE* file = nullptr;
  gzFile gz = nullptr;
  ZSTD_DCtx* dctx = nullptr;
  std::vector<char> in;
  ZSTD_inBuffer zin{nullptr, 0, 0};
  size_t last_ret = 0;           // zstd: 0 when a frame ended exactly
  bool may_hold_output = false;  // zstd: the last call filled the output

  ~Source() {
    if (file) std::fclose(file);
    if (gz) gzclose(gz);
    if (dctx) ZSTD_freeDCtx(dctx);
  }

  // Up to n bytes into out; 0 at the end. Throws std::runtime_error with the reason.
  size_t read(char* out, size_t n) {
    if (kind == Kind::kPlain) {
      const size_t got = std::fread(out, 1, n, file);
      if (got == 0 && std::ferror(file)) throw std::runtime_error("read failed");
      return got;
    }
    if (kind == Kind::kGzip) {
      const int got = gzread(gz, out, unsigned(n));
      if (got < 0) {
        int err = 0;
        const char* msg = gzerror(gz, &err);
        throw std::runtime_error(std::string("gzip: ") + (msg ? msg : "read failed"));
      }
      return size_t(got);
    }
    ZSTD_outBuffer zout{out, n, 0};
    while (zout.pos == 0) {
      // Input is read only once the decoder has flushed what it holds: a call that filled the output may
      // have more to give without new input.
      if (zin.pos == zin.size && !may_hold_output) {
        zin.size = std::fread(in.data(), 1, in.size(), file);
        zin.src = in.data();
        zin.pos = 0;
        if (zin.size == 0) {
          if (std::ferror(file)) throw std::runtime_error("read failed");
          if (last_ret != 0) throw std::runtime_error("zstd: the file ends inside a frame (truncated)");
          return 0;
        }
      }
      last_ret = ZSTD_decompressStream(dctx, &zout, &zin);
      if (ZSTD_isError(last_ret))
        throw std::runtime_error(std::string("zstd: ") + ZSTD_getErrorName(last_ret));
      may_hold_output = zout.pos == zout.size;
    }
    return zout.pos;
  }

  uint64_t consumed() const {
    if (kind == Kind::kGzip) return uint64_t(gzoffset(gz));
    return file ? uint64_t(std::ftell(file)) : 0;
  }
};

LineReader::LineReader(const std::string& path, size_t max_line)
    : src_(std::make_unique<Source>()), path_(path), max_line_(max_line) {
  std::error_code ec;
  file_bytes_ = fs::file_size(path, ec);
  if (ec) throw FileError(path, "cannot read: " + ec.message());
  if (ends_with(path, ".gz")) {
    src_->kind = Source::Kind::kGzip;
    src_->gz = gzopen(path.c_str(), "rb");
    if (!src_->gz) throw FileError(path, "cannot open for reading");
    gzbuffer(src_->gz, 1 << 20);
  } else {
    src_->file = std::fopen(path.c_str(), "rb");
    if (!src_->file) throw FileError(path, "cannot open for reading");
    if (ends_with(path, ".zst")) {
      src_->kind = Source::Kind::kZstd;
      src_->dctx = ZSTD_createDCtx();
      src_->in.resize(ZSTD_DStreamInSize());
    }
  }
}

LineReader::~LineReader() = default;

uint64_t LineReader::bytes_read() const {
  return src_->consumed();
}

bool LineReader::refill() {
  if (eof_) return false;
  if (pos_ > 0) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  const size_t chunk = 1 << 20;
  const size_t old = buf_.size();
  buf_.resize(old + chunk);
  size_t got = 0;
  try {
    got = src_->read(&buf_[old], chunk);
  } catch (const std::exception& e) {
    throw FileError(path_, std::string(e.what()) + " (after line " + std::to_string(line_no_) + ")");
  }
  buf_.resize(old + got);
  if (got == 0) eof_ = true;
  return got > 0;
}

bool LineReader::next(std::string& line, bool& cut) {
  cut = false;
  line.clear();
  while (true) {
    const size_t nl = buf_.find('\n', pos_);
    if (nl != std::string::npos) {
      const size_t len = nl - pos_;
      if (line.size() + len > max_line_) {
        line.append(buf_, pos_, max_line_ - std::min(max_line_, line.size()));
        cut = true;
      } else if (!cut) {
        line.append(buf_, pos_, len);
      }
      pos_ = nl + 1;
      ++line_no_;
      return true;
    }
    // No newline in the buffer: keep what fits in the line, drop the rest of an over-long one.
    const size_t avail = buf_.size() - pos_;
    if (!cut) {
      const size_t keep = std::min(avail, max_line_ - std::min(max_line_, line.size()));
      line.append(buf_, pos_, keep);
      if (keep < avail) cut = true;
    }
    pos_ = buf_.size();
    if (!refill()) {
      if (line.empty() && !cut) return false;
      ++line_no_;
      return true;  // the last line, without a final newline
    }
  }
}

namespace {

// One JSON line as a document, or why not (empty string: fine).
std::string parse_line(const std::string& line, const JsonlOptions& opt, Document& doc) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    return std::string("not JSON (") + e.what() + ")";
  }
  if (!j.is_object()) return "not a JSON object";
  auto t = j.find(opt.text_key);
  if (t == j.end()) return "has no \"" + opt.text_key + "\" key";
  if (!t->is_string()) return "\"" + opt.text_key + "\" is not a string";
  doc.text = t->get<std::string>();
  doc.domain = "text";
  auto d = j.find(opt.domain_key);
  if (d != j.end() && !d->is_null()) {
    if (!d->is_string() || d->get<std::string>().empty())
      return "\"" + opt.domain_key + "\" is not a non-empty string";
    doc.domain = d->get<std::string>();
  }
  return {};
}

bool blank(const std::string& s) {
  return s.find_first_not_of(" \t\r\n\f\v") == std::string::npos;
}

ReadCounts stream_jsonl(const std::string& path, const JsonlOptions& opt,
                        const std::function<void(Document&&)>& on_doc,
                        const std::function<void(uint64_t, uint64_t)>& progress) {
  LineReader in(path);
  ReadCounts c;
  std::string line;
  bool cut = false;
  uint64_t next_report = 0;
  while (in.next(line, cut)) {
    const std::string where = path + ":" + std::to_string(in.line_number());
    if (blank(line) && !cut) continue;  // blank lines separate nothing in JSON lines
    Document doc;
    std::string why;
    if (cut) {
      why = "longer than " + std::to_string(kMaxJsonLineBytes >> 20) + " MiB";
    } else if (const NonText bad = non_text_bytes(line); bad.bytes > 0) {
      // Invalid UTF-8 (or a raw NUL) anywhere in the line: JSON text is UTF-8.
      ++c.not_text;
      if (!opt.skip_bad_lines)
        throw FileError(where,
                        "is not UTF-8 text (byte " + std::to_string(bad.first) +
                            " of the line; data.bad_lines = \"skip\" skips such lines and counts them)");
      continue;
    } else {
      why = parse_line(line, opt, doc);
    }
    if (!why.empty()) {
      if (cut) ++c.cut_lines;
      ++c.bad_lines;
      if (!opt.skip_bad_lines)
        throw FileError(where, why + " (data.bad_lines = \"skip\" skips such lines and counts them)");
      continue;
    }
    if (blank(doc.text)) {
      ++c.empty;
      continue;
    }
    if (non_text_bytes(doc.text).bytes > 0) {
      ++c.not_text;
      if (!opt.skip_bad_lines)
        throw FileError(
            where, "\"" + opt.text_key +
                       "\" holds a NUL character, which is not text (data.bad_lines = \"skip\" skips such "
                       "lines and counts them)");
      continue;
    }
    std::string id = std::to_string(in.line_number());
    doc.id = std::string(id.size() < 12 ? 12 - id.size() : 0, '0') + id;
    doc.text = cut_long_lines(std::move(doc.text));
    ++c.documents;
    on_doc(std::move(doc));
    if (progress && in.bytes_read() >= next_report) {
      progress(in.bytes_read(), in.file_bytes());
      next_report = in.bytes_read() + (uint64_t(4) << 20);
    }
  }
  c.input_bytes = in.file_bytes();
  if (progress) progress(in.file_bytes(), in.file_bytes());
  return c;
}

ReadCounts stream_text_folder(const std::string& root_str, const std::function<void(Document&&)>& on_doc,
                              const std::function<void(uint64_t, uint64_t)>& progress) {
  const fs::path root(root_str);
  std::error_code ec;
  if (!fs::is_directory(root, ec)) throw FileError(root.string(), "no such folder");
  std::vector<fs::path> files;
  uint64_t total = 0;
  for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator(); ++it)
    if (it->is_regular_file() && it->path().extension() == ".txt") {
      files.push_back(it->path());
      total += it->file_size();
    }
  if (files.empty()) throw FileError(root.string(), "no .txt files in this folder or its sub-folders");
  std::sort(files.begin(), files.end());
  ReadCounts c;
  uint64_t done = 0;
  for (const auto& f : files) {
    const fs::path rel = f.lexically_relative(root);
    // The first folder under the root names the domain; files directly in the root are domain "text".
    Document doc{rel.generic_string(),
                 std::distance(rel.begin(), rel.end()) > 1 ? rel.begin()->string() : "text",
                 read_text_document(f.string())};
    done += fs::file_size(f, ec);
    if (blank(doc.text)) {
      ++c.empty;
      continue;
    }
    ++c.documents;
    on_doc(std::move(doc));
    if (progress) progress(done, total);
  }
  c.input_bytes = total;
  return c;
}

}  // namespace

ReadCounts stream_documents(const std::string& spec, const JsonlOptions& opt,
                            const std::function<void(Document&&)>& on_doc,
                            const std::function<void(uint64_t, uint64_t)>& progress) {
  if (spec.rfind("jsonl:", 0) == 0 && spec.size() > 6)
    return stream_jsonl(spec.substr(6), opt, on_doc, progress);
  if (spec.rfind("text:", 0) == 0 && spec.size() > 5)
    return stream_text_folder(spec.substr(5), on_doc, progress);
  throw ConfigError("--corpus", "'" + clipped(spec) + "' is not jsonl:PATH or text:PATH");
}

}  // namespace moeforge
