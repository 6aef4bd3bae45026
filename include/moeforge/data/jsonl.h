// Reading a user's corpus as a stream of documents (docs/data.md, "Your own corpus"): JSON lines (one
// object per line, plain, .gz or .zst) or a folder of .txt files, one document at a time, so that memory
// stays bounded whatever the input's size.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "moeforge/data/corpus.h"

namespace moeforge {

// The longest JSON line (one document) read: a longer one is a bad line (skipped and counted, or an error).
constexpr size_t kMaxJsonLineBytes = size_t(64) << 20;

// Lines of a file, decompressed on the fly by its extension (.gz: zlib, .zst: libzstd, else plain). A line
// longer than `max_line` bytes is returned cut to that length with `cut` set (its rest is skipped).
class LineReader {
 public:
  explicit LineReader(const std::string& path, size_t max_line = kMaxJsonLineBytes);
  ~LineReader();
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;
  // The next line without its '\n'; false at the end of the file. Throws FileError naming the file when
  // reading or decompressing fails (a truncated .gz or .zst included).
  bool next(std::string& line, bool& cut);
  // Bytes of the file consumed so far (compressed bytes for a compressed file), for progress.
  uint64_t bytes_read() const;
  uint64_t file_bytes() const { return file_bytes_; }
  int64_t line_number() const { return line_no_; }  // of the line next() returned last, from 1

 private:
  struct Source;
  std::unique_ptr<Source> src_;
  std::string path_, buf_;
  size_t pos_ = 0, max_line_;
  bool eof_ = false;
  int64_t line_no_ = 0;
  uint64_t file_bytes_ = 0;
  bool refill();
};

// How a JSON-lines corpus is read: the keys of the text and of the domain, and what a bad line does.
struct JsonlOptions {
  std::string text_key = "text";
  std::string domain_key = "domain";  // optional in each line; absent: domain "text"
  bool skip_bad_lines = false;        // false: a bad line is a FileError naming its line number
};

// data.jsonl_text_key, data.jsonl_domain_key and data.bad_lines.
JsonlOptions jsonl_options(const DataConfig& cfg);

// Counts of what a reader left out.
struct ReadCounts {
  int64_t documents = 0;  // handed on
  int64_t bad_lines = 0;  // not JSON, not an object, no text key, text not a string (skipped)
  int64_t empty = 0;      // empty or whitespace-only text (skipped)
  int64_t not_text = 0;   // text that is not UTF-8 (skipped with skip_bad_lines, else an error)
  int64_t cut_lines = 0;  // lines longer than the reader's limit (bad lines)
  uint64_t input_bytes = 0;
};

// Calls `on_doc` with each document of `spec` in order: "jsonl:PATH" (one object per line; id: its line
// number, zero-padded to 12 digits so that ids sort as lines do) or "text:DIR" (its .txt files in path
// order, sub-folder = domain), the text of each cut to kMaxLineBytes per line. Empty documents are left out
// and counted.
// `progress` (may be empty) gets (bytes consumed, total bytes) every few MB.
ReadCounts stream_documents(const std::string& spec, const JsonlOptions& opt,
                            const std::function<void(Document&&)>& on_doc,
                            const std::function<void(uint64_t, uint64_t)>& progress = {});

}  // namespace moeforge
