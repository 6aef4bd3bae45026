// The architecture's include rule (docs/architecture.md, "The include rule"): the table of which room may
// include which is read from the doc itself, and every quoted #include of src/, include/, apps/, bench/,
// kernels/, fuzz/ and python/ is checked against it. Also: section headers are leaves, and no MoCE name lives
// in model/, layer/, train/, data/, interop/, serve/ or apps/.
#include <fnmatch.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

struct IncludeRule {
  std::map<std::string, std::set<std::string>> may_include;  // room -> the other rooms it may include
  std::vector<std::string> section_headers;                  // "<room>/<file>" patterns (fnmatch)
};

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// The lines of `text` between "<!-- <name>:begin -->" and "<!-- <name>:end -->".
std::vector<std::string> marked_lines(const std::string& text, const std::string& name) {
  const std::string begin = "<!-- " + name + ":begin -->", end = "<!-- " + name + ":end -->";
  const size_t a = text.find(begin), b = text.find(end);
  if (a == std::string::npos || b == std::string::npos || b < a) return {};
  std::vector<std::string> lines;
  std::istringstream in(text.substr(a + begin.size(), b - a - begin.size()));
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// The names in backticks on a line: "| `train` | `util`, `model` |" -> {train, util, model}.
std::vector<std::string> backticked(const std::string& s) {
  std::vector<std::string> out;
  static const std::regex re("`([^`]+)`");
  for (auto it = std::sregex_iterator(s.begin(), s.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back((*it)[1]);
  return out;
}

IncludeRule read_rule(const fs::path& doc) {
  const std::string text = read_text(doc);
  IncludeRule rule;
  for (const auto& line : marked_lines(text, "include-rule")) {
    if (line.rfind("| `", 0) != 0) continue;  // the header and the separator row
    const auto names = backticked(line);
    if (names.empty()) continue;
    auto& allowed = rule.may_include[names.front()];
    allowed.insert(names.begin() + 1, names.end());
  }
  for (const auto& line : marked_lines(text, "section-headers"))
    for (const auto& n : backticked(line)) rule.section_headers.push_back(n);
  return rule;
}

// The room of a file of the tree: include/moeforge/<room>/..., src/<room>/..., or a top-level folder.
std::string room_of(const fs::path& rel) {
  auto it = rel.begin();
  const std::string top = it->string();
  if (top == "include" || top == "src") {
    if (top == "include") ++it;  // include/moeforge/<room>
    if (++it == rel.end()) return {};
    return it->string();
  }
  return top;
}

bool is_section_header(const IncludeRule& rule, const std::string& room_path) {
  for (const auto& p : rule.section_headers)
    if (fnmatch(p.c_str(), room_path.c_str(), 0) == 0) return true;
  return false;
}

// Every quoted #include of every source file under `root` against the rule; one line per violation.
std::vector<std::string> check_includes(const fs::path& root, const IncludeRule& rule) {
  std::vector<std::string> bad;
  static const std::regex include_re(R"re(^\s*#\s*include\s+"([^"]+)")re");
  for (const char* top : {"src", "include", "apps", "bench", "kernels", "fuzz", "python"}) {
    if (!fs::exists(root / top)) continue;
    for (const auto& entry : fs::recursive_directory_iterator(root / top)) {
      const auto ext = entry.path().extension().string();
      if (!entry.is_regular_file() || (ext != ".h" && ext != ".cpp" && ext != ".cu" && ext != ".cuh"))
        continue;
      const fs::path rel = fs::relative(entry.path(), root);
      const std::string room = room_of(rel);
      if (!rule.may_include.count(room)) {
        bad.push_back(rel.string() + ": room '" + room + "' has no row in the include-rule table");
        continue;
      }
      // "routing/moe_config.h" for include/moeforge/routing/moe_config.h
      const std::string self = rel.string().rfind("include/moeforge/", 0) == 0
                                   ? rel.string().substr(std::string("include/moeforge/").size())
                                   : std::string();
      const bool self_is_section = !self.empty() && is_section_header(rule, self);
      std::ifstream in(entry.path());
      int line_no = 0;
      for (std::string line; std::getline(in, line);) {
        ++line_no;
        std::smatch m;
        if (!std::regex_search(line, m, include_re)) continue;
        const std::string inc = m[1];
        std::string target, target_path;
        if (inc.rfind("moeforge/", 0) == 0) {
          target_path = inc.substr(9);
          target = target_path.substr(0, target_path.find('/'));
        } else if (inc.rfind("kernels/", 0) == 0 || inc.rfind("bench/", 0) == 0) {
          target = inc.substr(0, inc.find('/'));
        } else if (inc.rfind("../", 0) == 0) {
          const fs::path resolved =
              fs::relative(fs::weakly_canonical(entry.path().parent_path() / inc), root);
          target = room_of(resolved);
        } else {
          target = room;  // a header next to the file, or a generated one: its own room
        }
        const std::string where = rel.string() + ":" + std::to_string(line_no) + ": ";
        const bool target_is_section = !target_path.empty() && is_section_header(rule, target_path);
        if (self_is_section && !target_is_section) {
          bad.push_back(where + "section header includes \"" + inc +
                        "\" (section headers include only section headers)");
          continue;
        }
        if (target == room || target_is_section) continue;
        if (!rule.may_include.at(room).count(target))
          bad.push_back(where + "room '" + room + "' includes \"" + inc + "\" of room '" + target + "'");
      }
    }
  }
  return bad;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

// Files of the rooms that must not name MoCE, and the lines that do.
std::vector<std::string> moce_names(const fs::path& root) {
  std::vector<std::string> found;
  std::vector<fs::path> dirs = {root / "apps"};
  for (const char* r : {"model", "layer", "train", "data", "interop", "serve"}) {
    dirs.push_back(root / "src" / r);
    dirs.push_back(root / "include" / "moeforge" / r);
  }
  for (const auto& d : dirs) {
    if (!fs::exists(d)) continue;
    for (const auto& entry : fs::recursive_directory_iterator(d)) {
      if (!entry.is_regular_file()) continue;
      std::ifstream in(entry.path());
      int line_no = 0;
      for (std::string line; std::getline(in, line);) {
        ++line_no;
        if (lower(line).find("moce") != std::string::npos)
          found.push_back(fs::relative(entry.path(), root).string() + ":" + std::to_string(line_no) + ": " +
                          line);
      }
    }
  }
  return found;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += "\n  " + x;
  return s;
}

const fs::path kRoot = MOEFORGE_SOURCE_DIR;

TEST(Architecture, TheRuleTableIsRead) {
  const auto rule = read_rule(kRoot / "docs" / "architecture.md");
  for (const char* r :
       {"util", "config", "routing", "layer", "model", "train", "experiments", "bench", "apps"})
    EXPECT_TRUE(rule.may_include.count(r)) << r;
  EXPECT_TRUE(rule.may_include.at("util").empty());
  EXPECT_TRUE(rule.may_include.at("train").count("model"));
  EXPECT_FALSE(rule.may_include.at("model").count("train"));
  EXPECT_TRUE(is_section_header(rule, "routing/moce_options.h"));
  EXPECT_FALSE(is_section_header(rule, "routing/moce.h"));
}

TEST(Architecture, EveryIncludeFollowsTheRule) {
  const auto bad = check_includes(kRoot, read_rule(kRoot / "docs" / "architecture.md"));
  EXPECT_TRUE(bad.empty()) << bad.size() << " includes break docs/architecture.md's rule:" << joined(bad);
}

TEST(Architecture, NoMoceNameOutsideRoutingAndExperiments) {
  const auto found = moce_names(kRoot);
  EXPECT_TRUE(found.empty()) << found.size() << " lines name MoCE outside routing/:" << joined(found);
}

// The checker finds what it must: a copy of the rule over a small tree with planted violations.
TEST(Architecture, PlantedViolationsAreFound) {
  const fs::path root =
      fs::path(::testing::TempDir()) / ("moeforge_architecture_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "docs");
  fs::copy_file(kRoot / "docs" / "architecture.md", root / "docs" / "architecture.md",
                fs::copy_options::overwrite_existing);
  auto write = [&](const std::string& rel, const std::string& text) {
    fs::create_directories((root / rel).parent_path());
    std::ofstream(root / rel) << text;
  };
  const auto rule = read_rule(root / "docs" / "architecture.md");
  write("src/model/ok.cpp",
        "#include \"moeforge/layer/moe_layer.h\"\n#include \"moeforge/train/train_config.h\"\n");
  EXPECT_TRUE(check_includes(root, rule).empty()) << joined(check_includes(root, rule));
  write("src/model/up.cpp", "#include <vector>\n#include \"moeforge/train/trainer.h\"\n");
  write("include/moeforge/routing/x_options.h", "#include \"moeforge/routing/router.h\"\n");
  write("src/newroom/a.cpp", "#include \"moeforge/util/error.h\"\n");
  write("src/interop/m.cpp", "// MoCE's own field\n");
  const auto bad = check_includes(root, rule);
  ASSERT_EQ(bad.size(), 3u) << joined(bad);
  EXPECT_NE(joined(bad).find("src/model/up.cpp:2: room 'model' includes \"moeforge/train/trainer.h\""),
            std::string::npos)
      << joined(bad);
  EXPECT_NE(joined(bad).find("x_options.h:1: section header includes"), std::string::npos) << joined(bad);
  EXPECT_NE(joined(bad).find("room 'newroom' has no row"), std::string::npos) << joined(bad);
  EXPECT_EQ(moce_names(root).size(), 1u);
}

}  // namespace
}  // namespace moeforge
