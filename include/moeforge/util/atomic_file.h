// Nothing is lost (docs/reliability.md): files are written to a temporary name in the same folder, fsynced,
// renamed, and the folder fsynced, so that a crash or power cut leaves either the old or the new file.
#pragma once

#include <functional>
#include <ostream>
#include <string>

namespace moeforge {

// Writes `content` to `path` atomically. Throws FileError naming `path` on failure (disk full, file size
// limit, unwritable folder); `path` then keeps its previous content and no temporary file is left.
void write_file_atomic(const std::string& path, const std::string& content);

// Calls `write` with a stream, then writes what it wrote as write_file_atomic does.
void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& write);

// Writes `content` to `path` (created or truncated, not atomically) and fsyncs it. Throws FileError naming
// `path` and the system's reason.
void write_file_durable(const std::string& path, const std::string& content);

// fsyncs a folder, making the renames and creations inside it durable. Throws FileError naming it.
void fsync_dir(const std::string& dir);

// The folder holding `path` ("." for a bare name).
std::string parent_dir(const std::string& path);

}  // namespace moeforge
