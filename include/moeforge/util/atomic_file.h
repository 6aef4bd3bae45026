// Nothing is lost: files are written to a temporary name in the same folder, flushed, then renamed.
#pragma once

#include <functional>
#include <ostream>
#include <string>

namespace moeforge {

// Writes `content` to `path` atomically. Throws FileError naming the path on failure.
void write_file_atomic(const std::string& path, const std::string& content);

// Calls `write` with a stream on a temporary file beside `path`, then fsyncs and renames it to `path`.
void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& write);

}  // namespace moeforge
