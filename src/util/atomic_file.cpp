#include "moeforge/util/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "moeforge/util/error.h"

namespace moeforge {
namespace {

std::string errno_text(const char* what) {
  return std::string(what) + ": " + std::strerror(errno) +
         (errno == ENOSPC || errno == EFBIG || errno == EDQUOT ? " (disk full or file size limit)" : "");
}

}  // namespace

void write_file_durable(const std::string& path, const std::string& content) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw FileError(path, errno_text("cannot open for writing"));
  size_t done = 0;
  while (done < content.size()) {
    const ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = n < 0 ? errno_text("write failed") : "write failed: no progress";
      ::close(fd);
      throw FileError(
          path, why + " after " + std::to_string(done) + " of " + std::to_string(content.size()) + " bytes");
    }
    done += size_t(n);
  }
  if (::fsync(fd) != 0) {
    const std::string why = errno_text("fsync failed");
    ::close(fd);
    throw FileError(path, why);
  }
  if (::close(fd) != 0) throw FileError(path, errno_text("close failed"));
}

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw FileError(dir, errno_text("cannot open folder to sync it"));
  const int rc = ::fsync(fd);
  const int err = errno;
  const std::string why = rc != 0 ? errno_text("fsync of the folder failed") : "";
  ::close(fd);
  // Some filesystems do not support fsync on a folder (EINVAL); their renames are as durable as they get.
  if (rc != 0 && err != EINVAL) throw FileError(dir, why);
}

std::string parent_dir(const std::string& path) {
  const auto parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? "." : parent.string();
}

void write_file_atomic(const std::string& path, const std::string& content) {
  // docs/reliability.md: write a temporary beside `path`, fsync it, rename it over `path`, fsync the
  // folder; a failure at any point leaves the previous `path` as it was and no temporary behind.
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  try {
    write_file_durable(tmp, content);
  } catch (const FileError& e) {
    std::remove(tmp.c_str());
    // Name the file the caller asked for; the temporary's name says nothing to the user.
    std::string why = e.what();
    why = why.substr(std::min(why.size(), tmp.size() + 2));
    throw FileError(path, why);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw FileError(path, "cannot rename temporary file into place: " + why);
  }
  fsync_dir(parent_dir(path));
}

void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& write) {
  std::ostringstream os;
  write(os);
  write_file_atomic(path, os.str());
}

}  // namespace moeforge
