#include "moeforge/data/corpus.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "moeforge/data/jsonl.h"
#include "moeforge/data/random.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

const char* kInstallHint = "run scripts/install-deps.sh to install the Brown corpus, or set data.dir";

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path.string(), "cannot open for reading");
  std::ostringstream os;
  os << in.rdbuf();
  if (in.bad()) throw FileError(path.string(), "read failed");
  return os.str();
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// Punctuation that Brown writes as its own token but that attaches to the word before it.
bool attaches_left(const std::string& w) {
  static const std::set<std::string> kLeft = {",", ".", ";", ":", "?", "!", ")", "''", "'"};
  return kLeft.count(w) != 0;
}

// ... and punctuation that attaches to the word after it.
bool attaches_right(const std::string& w) {
  return w == "(" || w == "``";
}

std::vector<Document> load_brown(const DataConfig& cfg) {
  const fs::path dir = fs::path(cfg.dir) / "brown";
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw FileError(dir.string(), std::string("no such folder; ") + kInstallHint);
  std::map<char, std::string> genre;
  for (const auto& [letter, name] : brown_genres()) genre[letter] = name;

  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    // Documents are named c<genre letter><two digits>; CONTENTS, README, cats.txt etc. are not documents.
    const bool is_doc = name.size() == 4 && name[0] == 'c' && name[1] >= 'a' && name[1] <= 'z' &&
                        std::isdigit(static_cast<unsigned char>(name[2])) &&
                        std::isdigit(static_cast<unsigned char>(name[3]));
    if (!is_doc) continue;
    if (!genre.count(name[1]))
      throw FileError(entry.path().string(), std::string("unknown Brown genre letter '") + name[1] + "'");
    files.push_back(entry.path());
  }
  if (files.empty())
    throw FileError(dir.string(),
                    std::string("no Brown documents (ca01 .. cr09) in this folder; ") + kInstallHint);
  std::sort(files.begin(), files.end());

  std::vector<Document> docs;
  docs.reserve(files.size());
  for (const auto& path : files) {
    const std::string name = path.filename().string();
    Document d{name, genre[name[1]], brown_detokenize(read_file(path), path.string())};
    if (d.text.empty()) throw FileError(path.string(), "holds no tagged tokens");
    docs.push_back(std::move(d));
  }
  return docs;
}

}  // namespace

std::string read_text_document(const std::string& path_str) {
  const fs::path path(path_str);
  std::string text = read_file(path);
  const NonText bad = non_text_bytes(text);
  if (bad.share(text.size()) > kMaxNonTextShare)
    throw FileError(path.string(), "is not UTF-8 text (" + std::to_string(int(100 * bad.share(text.size()))) +
                                       "% of its bytes are not, the first at byte " +
                                       std::to_string(bad.first) +
                                       "); a text corpus holds .txt files of UTF-8 text: move this one out");
  return cut_long_lines(std::move(text));
}

namespace {

std::vector<Document> load_text_folder(const std::string& root_str) {
  const fs::path root(root_str);
  std::error_code ec;
  if (!fs::is_directory(root, ec))
    throw FileError(root.string(), "no such folder (data.corpus = \"text:" + root_str + "\")");
  std::vector<Document> docs;
  for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator(); ++it) {
    if (!it->is_regular_file() || it->path().extension() != ".txt") continue;
    const fs::path rel = it->path().lexically_relative(root);
    // The first folder under the root names the domain; files directly in the root are domain "text".
    const std::string domain = std::distance(rel.begin(), rel.end()) > 1 ? rel.begin()->string() : "text";
    docs.push_back(Document{rel.generic_string(), domain, read_text_document(it->path().string())});
  }
  if (docs.empty()) throw FileError(root.string(), "no .txt files in this folder or its sub-folders");
  std::sort(docs.begin(), docs.end(), [](const Document& a, const Document& b) { return a.id < b.id; });
  return docs;
}

}  // namespace

std::string cut_long_lines(std::string text, size_t max_line) {
  max_line = std::max<size_t>(max_line, 8);
  size_t start = 0;  // of the current line
  bool changed = false;
  std::string out;
  for (size_t i = 0; i <= text.size(); ++i) {
    if (i < text.size() && text[i] != '\n') continue;
    // [start, i) is one line.
    size_t s = start;
    while (i - s > max_line) {
      size_t cut = s + max_line;
      size_t space = cut;
      while (space > s && text[space] != ' ') --space;
      if (space > s) {
        cut = space;
      } else {
        while (cut > s && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;  // not mid-character
        if (cut == s) cut = s + max_line;
      }
      if (!changed) out.assign(text, 0, s), changed = true;
      out.append(text, s, cut - s);
      out.push_back('\n');
      s = cut + (text[cut] == ' ' ? 1 : 0);
    }
    if (changed) out.append(text, s, i - s + (i < text.size() ? 1 : 0));
    start = i + 1;
  }
  return changed ? out : text;
}

NonText non_text_bytes(const std::string& text) {
  NonText r;
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool ok = c != 0 && len > 0 && i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) ok = (p[i + k] & 0xC0) == 0x80;
    if (ok) {
      i += len;
      continue;
    }
    if (r.first == std::string::npos) r.first = i;
    ++r.bytes;  // one byte at a time: the rest of a broken sequence is looked at on its own
    ++i;
  }
  return r;
}

const std::vector<std::pair<char, std::string>>& brown_genres() {
  // From the corpus's CONTENTS file.
  static const std::vector<std::pair<char, std::string>> kGenres = {
      {'a', "press_reportage"}, {'b', "press_editorial"}, {'c', "press_reviews"},  {'d', "religion"},
      {'e', "skill_hobbies"},   {'f', "popular_lore"},    {'g', "belles_lettres"}, {'h', "government"},
      {'j', "learned"},         {'k', "fiction_general"}, {'l', "mystery"},        {'m', "science_fiction"},
      {'n', "adventure"},       {'p', "romance"},         {'r', "humor"}};
  return kGenres;
}

std::string brown_detokenize(const std::string& tagged, const std::string& where) {
  std::string out;
  out.reserve(tagged.size() * 3 / 5);  // tags are roughly 40% of the bytes
  bool glue_next = false;              // the previous token opened a quote or a parenthesis
  size_t line = 1;
  size_t i = 0;
  const size_t n = tagged.size();
  while (i < n) {
    if (is_space(tagged[i])) {
      line += tagged[i] == '\n';
      ++i;
      continue;
    }
    const size_t start = i;
    while (i < n && !is_space(tagged[i])) ++i;
    const std::string token = tagged.substr(start, i - start);
    // The tag follows the last slash: words may hold slashes themselves ("//in" is the word "/").
    const size_t slash = token.rfind('/');
    if (slash == std::string::npos || slash == 0)
      throw FileError(where, "line " + std::to_string(line) + ": token '" + token + "' is not word/tag");
    const std::string word = token.substr(0, slash);
    if (!out.empty() && !glue_next && !attaches_left(word)) out += ' ';
    out += (word == "``" || word == "''") ? std::string("\"") : word;
    glue_next = attaches_right(word);
  }
  return out;
}

std::vector<Document> load_corpus(const DataConfig& cfg) {
  if (cfg.corpus == "brown") return load_brown(cfg);
  if (cfg.corpus.rfind("text:", 0) == 0 && cfg.corpus.size() > 5)
    return load_text_folder(cfg.corpus.substr(5));
  if (cfg.corpus.rfind("jsonl:", 0) == 0 && cfg.corpus.size() > 6) {
    std::vector<Document> docs;
    stream_documents(cfg.corpus, jsonl_options(cfg), [&](Document&& d) { docs.push_back(std::move(d)); });
    if (docs.empty()) throw FileError(cfg.corpus.substr(6), "holds no document");
    return docs;
  }
  if (cfg.corpus.rfind("shards:", 0) == 0)  // token ids, not documents: prepare_data maps them
    throw ConfigError("data.corpus",
                      "\"shards:\" holds token ids, read by prepare_data (data/prepare.h), not loaded");
  if (cfg.corpus == "instruct")  // samples, not documents: prepare_data generates them
    throw ConfigError("data.corpus",
                      "\"instruct\" is generated by generate_instruct (data/instruct.h), not loaded");
  throw ConfigError("data.corpus", "unknown corpus '" + cfg.corpus +
                                       "' (expected \"brown\", \"text:PATH\" or \"jsonl:PATH\")");
}

int64_t domain_id(const std::vector<std::string>& domains, const std::string& domain) {
  auto it = std::lower_bound(domains.begin(), domains.end(), domain);
  return it != domains.end() && *it == domain ? it - domains.begin() : -1;
}

CorpusSplit split_corpus(std::vector<Document> docs, const DataConfig& cfg) {
  std::sort(docs.begin(), docs.end(), [](const Document& a, const Document& b) { return a.id < b.id; });
  CorpusSplit split;
  std::set<std::string> all;
  for (const auto& d : docs) all.insert(d.domain);
  split.domains.assign(all.begin(), all.end());

  // Held-out genres by name, or, for Brown genres, by letter.
  std::set<std::string> heldout;
  for (const auto& g : cfg.heldout_genres) {
    std::string name = g;
    for (const auto& [letter, genre] : brown_genres())
      if (g == std::string(1, letter) && all.count(genre)) name = genre;
    if (!all.count(name)) {
      std::string names;
      for (const auto& d : split.domains) names += (names.empty() ? "" : ", ") + d;
      throw ConfigError("data.heldout_genres", "unknown genre '" + g + "' (this corpus has: " + names + ")");
    }
    heldout.insert(name);
  }
  if (heldout.size() == all.size())
    throw ConfigError("data.heldout_genres", "holds out every genre, leaving nothing to train on");

  std::map<std::string, std::vector<Document>> by_domain;
  for (auto& d : docs) {
    if (heldout.count(d.domain))
      split.heldout.push_back(std::move(d));
    else
      by_domain[d.domain].push_back(std::move(d));
  }
  for (auto& [domain, group] : by_domain) {
    const int64_t n = static_cast<int64_t>(group.size());
    int64_t n_val = std::llround(cfg.validation_fraction * static_cast<double>(n));
    // Every domain is measured on validation when asked for, and keeps at least one training document.
    if (cfg.validation_fraction > 0 && n >= 2) n_val = std::max<int64_t>(n_val, 1);
    n_val = std::min(n_val, n - 1);
    // Each domain draws its own permutation, so adding a domain does not reshuffle the others.
    const auto perm = seeded_permutation(n, fnv1a64(domain, static_cast<uint64_t>(cfg.seed)));
    std::vector<bool> is_val(static_cast<size_t>(n), false);
    for (int64_t i = 0; i < n_val; ++i) is_val[perm[i]] = true;
    for (int64_t i = 0; i < n; ++i)
      (is_val[i] ? split.validation : split.train).push_back(std::move(group[i]));
  }
  auto by_id = [](const Document& a, const Document& b) { return a.id < b.id; };
  std::sort(split.train.begin(), split.train.end(), by_id);
  std::sort(split.validation.begin(), split.validation.end(), by_id);
  return split;
}

}  // namespace moeforge
