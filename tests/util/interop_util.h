// Helpers of the interop tests (test_interop_*.cpp): running commands, temporary folders, and tiny models
// trained through the CLI (MOEFORGE_CLI is the moeforge binary).
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "moeforge/model/checkpoint.h"
#include "test_util.h"

namespace moeforge::test {

// Runs `cmd` through the shell; returns its stdout, the exit status in *rc.
inline std::string run_capture(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) {
    *rc = -1;
    return out;
  }
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  *rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

inline std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// An empty folder of this process's own.
inline std::string fresh_dir(const std::string& name) {
  auto d = std::filesystem::path(::testing::TempDir()) /
           ("moeforge_interop_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}

// Trains a tiny model through the CLI (`moeforge train --set ...`); returns its final checkpoint folder.
inline std::string train_cli(const std::string& name, const std::vector<std::string>& extra) {
  const std::string out = fresh_dir("run_" + name);
  std::string cmd = std::string(MOEFORGE_CLI) + " train --no-report --out " + quote(out);
  for (auto& o : tiny_run_overrides("interop_" + name, extra)) cmd += " --set " + quote(o);
  int rc = 0;
  const std::string log = run_capture(cmd + " 2>&1", &rc);
  EXPECT_EQ(rc, 0) << log;
  return resolve_checkpoint_dir(out + "/checkpoints");
}

// The settings of the interop tests' tiny models: a context long enough for two sentences, 4 experts, top-2.
inline std::vector<std::string> interop_overrides(std::vector<std::string> extra) {
  // byte_fallback: llama.cpp needs byte pieces (docs/interop.md); they take 256 of the vocabulary.
  std::vector<std::string> o = {"data.vocab_size=320", "data.byte_fallback=true", "data.seq_len=48",
                                "moe.router=\"topk\"", "train.steps=30",          "model.n_head=2",
                                "moe.n_expert=4",      "moe.n_expert_used=2"};
  o.insert(o.end(), extra.begin(), extra.end());
  return o;
}

}  // namespace moeforge::test
