#include "moeforge/util/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "moeforge/util/error.h"

namespace moeforge {

void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& write) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw FileError(path, std::string("cannot open for writing: ") + std::strerror(errno));
    write(out);
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      throw FileError(path, "write failed (disk full?)");
    }
  }
  // Make the data durable before the rename makes it visible.
  const int fd = ::open(tmp.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw FileError(path, "cannot rename temporary file into place: " + why);
  }
}

void write_file_atomic(const std::string& path, const std::string& content) {
  write_file_atomic(path,
                    [&](std::ostream& os) { os.write(content.data(), std::streamsize(content.size())); });
}

}  // namespace moeforge
