// A run folder (train --out) is owned by one process, and a run never writes over another one's files
// without being told to (docs/reliability.md, "Shared folders and limits").
#pragma once

#include <ostream>
#include <string>

namespace moeforge {

// An exclusive lock on <dir>/.lock (flock), which the kernel releases when the process ends however it
// ends, so a killed run never blocks the next. The lock file holds the holder's pid, which a refused
// process names. Creates `dir`. Throws FileError naming the folder and the holder when another process
// holds it, or when the folder cannot be created or written.
class RunFolderLock {
 public:
  explicit RunFolderLock(const std::string& dir);
  ~RunFolderLock();
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;

 private:
  int fd_ = -1;
};

// What a run folder already holds of an earlier run: "" when nothing, else a short list
// ("metrics.jsonl, checkpoints/step-000083").
std::string earlier_run_in(const std::string& dir);

// Before a fresh (not resumed) run writes into `dir`: a folder that holds an earlier run is refused with a
// FileError saying how to resume it or to start afresh, unless `overwrite`, which removes the earlier run's
// metrics.jsonl, checkpoints/, dist.json, report.md and plots/ (said on `log`).
void claim_for_fresh_run(const std::string& dir, bool overwrite, std::ostream& log);

// Removes the temporary checkpoint folders (step-N.tmp-PID, step-N.old-PID) under `checkpoints` whose
// process is gone (killed mid-write), saying so on `log`; returns how many.
int remove_stale_temporaries(const std::string& checkpoints, std::ostream& log);

// Throws FileError naming `dir` unless a file can be created, written and removed there (creates `dir`).
void check_writable(const std::string& dir);

}  // namespace moeforge
