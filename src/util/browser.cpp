// Pages as pictures with headless Chromium (browser.h).
#include "moeforge/util/browser.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {

std::string browser() {
  const char* env = std::getenv("MOEFORGE_CHROMIUM");
  return env && *env ? env : "chromium";
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// Runs the browser on `html` with `extra` flags; its stdout is returned, its stderr kept for the error.
std::string run_browser(const std::string& html, const std::vector<std::string>& extra, double timeout_s) {
  std::error_code ec;
  const fs::path page = fs::absolute(html, ec);
  if (ec || !fs::is_regular_file(page)) throw FileError(html, "no such page to render");
  // mkdtemp's template: the prefix and six 'X' that it replaces with a unique suffix.
  std::string tmpl = "/tmp/moeforge-chromium-" + std::string(6, 'X');
  if (!::mkdtemp(tmpl.data())) throw FileError(html, "cannot make a profile folder for the browser in /tmp");
  const fs::path dir = tmpl;
  const fs::path out = dir / "stdout", err = dir / "stderr";
  std::vector<std::string> args = {browser(),
                                   "--headless",
                                   "--no-sandbox",
                                   "--disable-gpu",
                                   "--disable-quic",
                                   "--no-first-run",
                                   "--disable-background-networking",
                                   "--disable-component-update",
                                   "--disable-sync",
                                   "--disable-extensions",
                                   "--hide-scrollbars",
                                   "--user-data-dir=" + (dir / "profile").string()};
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back("file://" + page.string());
  const pid_t pid = ::fork();
  if (pid < 0) {
    fs::remove_all(dir, ec);
    throw FileError(html, "cannot start the browser (fork failed)");
  }
  if (pid == 0) {
    ::setpgid(0, 0);  // its own process group: a time-out ends the browser's helpers too
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0) _exit(126);
    ::dup2(o, 1);
    ::dup2(e, 2);
    ::setenv("HOME", dir.c_str(), 1);  // whatever it writes outside its profile stays in the folder
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    _exit(127);
  }
  ::setpgid(pid, pid);
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  int status = 0;
  bool timed_out = false;
  for (;;) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0) break;
    if (std::chrono::steady_clock::now() >= until) {
      ::kill(-pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(-pid, SIGKILL);  // helpers the browser left behind
  const std::string stdout_text = slurp(out), stderr_text = slurp(err);
  fs::remove_all(dir, ec);
  if (timed_out)
    throw FileError(html, browser() + " ran past " + std::to_string(int(timeout_s)) + " s and was stopped");
  if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
    throw FileError(html, "cannot run " + browser() +
                              " (scripts/install-deps.sh installs Debian's chromium; MOEFORGE_CHROMIUM names "
                              "another)");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw FileError(html, browser() + " failed: " + clipped(stderr_text, 400));
  return stdout_text;
}

}  // namespace

void screenshot_page(const std::string& html, const std::string& png, int width, int height,
                     double timeout_s) {
  if (width < 16 || height < 16 || width > 8192 || height > 16384)
    throw FileError(png, "a screenshot of " + std::to_string(width) + " x " + std::to_string(height) +
                             " pixels: each side must be in [16, 8192] (height 16384)");
  std::error_code ec;
  const fs::path target = fs::absolute(png, ec);
  fs::remove(target, ec);
  run_browser(
      html,
      {"--screenshot=" + target.string(),
       "--window-size=" + std::to_string(width) + "," + std::to_string(height), "--virtual-time-budget=2000"},
      timeout_s);
  if (!fs::is_regular_file(target) || fs::file_size(target) == 0)
    throw FileError(png, browser() + " wrote no screenshot of " + html);
}

std::string dump_page_dom(const std::string& html, double timeout_s) {
  return run_browser(html, {"--dump-dom", "--virtual-time-budget=2000"}, timeout_s);
}

}  // namespace moeforge
