// Pages as pictures: Debian's Chromium, headless, run on a self-contained HTML file (`trace-view --png`,
// and the test that checks the page renders; docs/serve.md, "The page"). The browser is
// $MOEFORGE_CHROMIUM when set, else `chromium` on the PATH (scripts/install-deps.sh installs it). Each run
// gets a fresh profile folder, no network services, and a time limit.
#pragma once

#include <string>

namespace moeforge {

// A width x height screenshot of `html` (a file) as the PNG `png`. Throws FileError naming the page when
// the browser is missing, fails, runs past `timeout_s` or writes no picture.
void screenshot_page(const std::string& html, const std::string& png, int width, int height,
                     double timeout_s = 120);

// The page's DOM after its scripts ran, as the browser serialises it (--dump-dom). Errors as above.
std::string dump_page_dom(const std::string& html, double timeout_s = 120);

}  // namespace moeforge
