// A run folder owned by one process (run_folder.h, docs/reliability.md "Shared folders and limits").
#include "moeforge/train/run_folder.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <vector>

#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {

// The pid a lock file holds, or "" when it holds none.
std::string lock_holder(const fs::path& path) {
  std::ifstream in(path);
  std::string pid;
  in >> pid;
  return pid.find_first_not_of("0123456789") == std::string::npos ? pid : std::string();
}

}  // namespace

RunFolderLock::RunFolderLock(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw FileError(dir, "cannot create the run folder: " + ec.message());
  const fs::path path = fs::path(dir) / ".lock";
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0)
    throw FileError(path.string(),
                    std::string("cannot create the run folder's lock: ") + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK) {
      const std::string pid = lock_holder(path);
      throw FileError(dir, "in use by another run (process " + (pid.empty() ? std::string("unknown") : pid) +
                               " holds " + path.string() +
                               "): wait for it to end, or give this run another --out");
    }
    throw FileError(path.string(), std::string("cannot lock: ") + std::strerror(err));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != ssize_t(pid.size()))
    throw FileError(path.string(), std::string("cannot write the lock's pid: ") + std::strerror(errno));
}

RunFolderLock::~RunFolderLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the flock
}

std::string earlier_run_in(const std::string& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  if (fs::exists(fs::path(dir) / "metrics.jsonl", ec)) found.push_back("metrics.jsonl");
  const fs::path ckpts = fs::path(dir) / "checkpoints";
  std::vector<std::string> steps;
  if (fs::is_directory(ckpts, ec))
    for (const auto& e : fs::directory_iterator(ckpts, ec)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("step-", 0) == 0 && name.find('.') == std::string::npos) steps.push_back(name);
    }
  std::sort(steps.begin(), steps.end());
  if (!steps.empty()) found.push_back("checkpoints/" + steps.back());
  std::string out;
  for (const auto& f : found) out += (out.empty() ? "" : ", ") + f;
  return out;
}

void claim_for_fresh_run(const std::string& dir, bool overwrite, std::ostream& log) {
  const std::string earlier = earlier_run_in(dir);
  if (earlier.empty()) return;
  if (!overwrite)
    throw FileError(dir, "holds an earlier run (" + earlier + "): resume it with --resume " +
                             (fs::path(dir) / "checkpoints").string() +
                             ", give this run another --out, or pass --overwrite to replace it");
  std::error_code ec;
  for (const char* name : {"metrics.jsonl", "checkpoints", "dist.json", "report.md", "plots"}) {
    fs::remove_all(fs::path(dir) / name, ec);
    if (ec) throw FileError((fs::path(dir) / name).string(), "cannot remove (--overwrite): " + ec.message());
  }
  log << "--overwrite: removed the earlier run in " << dir << " (" << earlier << ")\n";
}

int remove_stale_temporaries(const std::string& checkpoints, std::ostream& log) {
  static const std::regex temporary(R"re(step-\d+\.(tmp|old)-(\d+))re");
  std::error_code ec;
  if (!fs::is_directory(checkpoints, ec)) return 0;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(checkpoints, ec)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (!std::regex_match(name, m, temporary)) continue;
    const long pid = std::stol(m[2].str());
    // Gone: no such process (a live one, even another user's, answers 0 or EPERM).
    if (pid != long(::getpid()) && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH) stale.push_back(e.path());
  }
  for (const auto& p : stale) {
    fs::remove_all(p, ec);
    log << "removed " << p.string() << ": a checkpoint its process (gone) left half-written\n";
  }
  return int(stale.size());
}

void check_writable(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw FileError(dir, "cannot create the folder: " + ec.message());
  const fs::path probe = fs::path(dir) / (".write-test-" + std::to_string(::getpid()));
  {
    std::ofstream out(probe);
    if (!out || !(out << "x") || !out.flush())
      throw FileError(dir, "not writable (checked before training, so that no step is lost to it)");
  }
  fs::remove(probe, ec);
}

}  // namespace moeforge
