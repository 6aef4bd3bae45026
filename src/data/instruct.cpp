// The instruction-data generator (docs/instruct-data.md). Three sources: the Brown corpus's tagged
// sentences, WordNet 3.0's data and index files (the format of Princeton's wndb(5) page: one synset per
// line, "offset lex_filenum ss_type w_cnt word lex_id ... p_cnt pointer... | gloss"), and word lists and
// numbers drawn from the Brown vocabulary.
#include "moeforge/data/instruct.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <unordered_map>

#include "moeforge/data/random.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

const char* kBrownHint = "run scripts/install-deps.sh to install the Brown corpus, or set data.dir";
const char* kWordNetHint =
    "install Debian's wordnet-base (scripts/install-deps.sh does), or set data.wordnet_dir";

// ---------------------------------------------------------------------------------------------- helpers

uint64_t draw(std::mt19937_64& rng, size_t n) {
  // Modulo, not std::uniform_int_distribution: the same numbers on every standard library (random.h).
  return rng() % static_cast<uint64_t>(n);
}

std::string fill(std::string text, const std::map<std::string, std::string>& values) {
  for (const auto& [name, value] : values) {
    const std::string slot = "{" + name + "}";
    for (size_t at = text.find(slot); at != std::string::npos; at = text.find(slot, at + value.size()))
      text.replace(at, slot.size(), value);
  }
  return text;
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

bool is_letters(const std::string& w) {
  return !w.empty() &&
         std::all_of(w.begin(), w.end(), [](char c) { return std::isalpha(static_cast<unsigned char>(c)); });
}

bool is_lower_word(const std::string& w) {
  return !w.empty() && std::all_of(w.begin(), w.end(), [](char c) { return c >= 'a' && c <= 'z'; });
}

std::string join(const std::vector<std::string>& words, const std::string& sep = " ") {
  std::string out;
  for (const auto& w : words) out += (out.empty() ? "" : sep) + w;
  return out;
}

std::vector<std::string> split_ws(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// 0 .. 999 in words, as the arithmetic and counting tasks answer.
std::string number_words(int64_t n) {
  static const char* kOnes[] = {"zero",    "one",     "two",       "three",    "four",
                                "five",    "six",     "seven",     "eight",    "nine",
                                "ten",     "eleven",  "twelve",    "thirteen", "fourteen",
                                "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"};
  static const char* kTens[] = {"",      "",      "twenty",  "thirty", "forty",
                                "fifty", "sixty", "seventy", "eighty", "ninety"};
  if (n < 20) return kOnes[n];
  if (n < 100) return std::string(kTens[n / 10]) + (n % 10 ? std::string("-") + kOnes[n % 10] : "");
  return std::string(kOnes[n / 100]) + " hundred" + (n % 100 ? " and " + number_words(n % 100) : "");
}

// ------------------------------------------------------------------------------------------- the tasks

struct TaskSpec {
  InstructTask info;
  std::vector<std::string> templates;  // "{slot}" markers filled per sample; each ends in "Answer:"
};

const std::vector<TaskSpec>& task_specs() {
  static const std::vector<TaskSpec> kSpecs = {
      {{"pos_tag", "corpus", "brown",
        "the part of speech of a word in a Brown sentence (its tag, coarsened)"},
       {"What part of speech is the word \"{w}\" in the sentence \"{s}\"? Answer:",
        "In \"{s}\", which word class does \"{w}\" belong to? Answer:",
        "Tag the word \"{w}\" with its part of speech as it is used here: \"{s}\" Answer:",
        "Sentence: \"{s}\" Give the part of speech of \"{w}\". Answer:"}},
      {{"first_of_pos", "corpus", "brown", "the first noun / verb / adjective / adverb of a Brown sentence"},
       {"Which is the first {c} in the sentence \"{s}\"? Answer:",
        "Find the first word used as {c} in \"{s}\". Answer:",
        "Sentence: \"{s}\" Write the first {c} of this sentence. Answer:"}},
      {{"genre", "corpus", "brown", "the Brown genre a sentence comes from, out of the 15 listed"},
       {"Which genre of writing is this sentence from: \"{s}\"? Choose from: {o}. Answer:",
        "Sentence: \"{s}\" Name the kind of text it comes from ({o}). Answer:",
        "Classify the genre of \"{s}\". The genres are {o}. Answer:"}},
      {{"define", "lexical", "wordnet",
        "the word (of a given part of speech) that a WordNet definition defines"},
       {"Which {p} means \"{d}\"? Answer:", "Give the {p} defined as \"{d}\". Answer:",
        "Definition ({p}): \"{d}\" What is the word? Answer:"}},
      {{"synonym", "lexical", "wordnet",
        "another word of the WordNet synset of a word's most frequent sense"},
       {"Give a synonym of \"{w}\". Answer:", "Which word means the same as \"{w}\"? Answer:",
        "Name another word for \"{w}\". Answer:"}},
      {{"antonym", "lexical", "wordnet", "a WordNet antonym (! pointer) of a word"},
       {"Give an antonym of \"{w}\". Answer:", "Which word means the opposite of \"{w}\"? Answer:",
        "Name the opposite of \"{w}\". Answer:"}},
      {{"hypernym", "lexical", "wordnet", "a WordNet hypernym (@ pointer) of a noun's most frequent sense"},
       {"What is \"{w}\" a kind of? Answer:", "Give a more general word for \"{w}\". Answer:",
        "What category does \"{w}\" belong to? Answer:"}},
      {{"fill_blank", "lexical", "wordnet", "the word missing from one of WordNet's example sentences"},
       {"Fill in the blank with one word: \"{e}\" Answer:",
        "Which word completes the sentence \"{e}\"? Answer:",
        "Complete with the missing word: \"{e}\" Answer:"}},
      {{"word_class", "lexical", "wordnet",
        "noun, verb, adjective or adverb, for a word WordNet lists under one"},
       {"Is \"{w}\" a noun, a verb, an adjective or an adverb? Answer:",
        "Which part of speech is the word \"{w}\": noun, verb, adjective or adverb? Answer:",
        "Word: \"{w}\" Say whether it is a noun, verb, adjective or adverb. Answer:"}},
      {{"reverse_words", "sequence", "generated", "the words of a list in reverse order"},
       {"Reverse the order of these words: \"{l}\" Answer:", "Write \"{l}\" backwards, word by word. Answer:",
        "Words: \"{l}\" List them from last to first. Answer:"}},
      {{"sort_words", "sequence", "generated", "the words of a list in alphabetical order"},
       {"Sort these words alphabetically: \"{l}\" Answer:", "Put \"{l}\" in alphabetical order. Answer:",
        "Words: \"{l}\" List them from A to Z. Answer:"}},
      {{"count_words", "sequence", "generated", "the number of words in a list, in words"},
       {"How many words are in \"{l}\"? Answer:", "Count the words: \"{l}\" Answer:",
        "Words: \"{l}\" How many are there? Answer:"}},
      {{"copy_upper", "sequence", "generated", "the words of a list copied in capital letters"},
       {"Copy these words in capital letters: \"{l}\" Answer:", "Write \"{l}\" in upper case. Answer:",
        "Words: \"{l}\" Repeat them in capitals. Answer:"}},
      {{"add", "arithmetic", "generated", "the sum of two numbers 0..99, all in words"},
       {"What is {a} plus {b}? Answer:", "Add {a} and {b}. Answer:",
        "Compute the sum of {a} and {b}, in words. Answer:"}},
      {{"subtract", "arithmetic", "generated",
        "the difference of two numbers 0..99 (never negative), in words"},
       {"What is {a} minus {b}? Answer:", "Subtract {b} from {a}. Answer:",
        "Compute the difference of {a} and {b}, in words. Answer:"}},
  };
  return kSpecs;
}

const TaskSpec* find_spec(const std::string& name) {
  for (const auto& s : task_specs())
    if (s.info.name == name) return &s;
  return nullptr;
}

std::string task_names() {
  std::string all;
  for (const auto& s : task_specs()) all += (all.empty() ? "" : ", ") + s.info.name;
  return all;
}

// ------------------------------------------------------------------------------------ the Brown corpus

struct BrownToken {
  std::string word, cls;  // cls: the coarse part of speech, empty when the tag has none
};

struct BrownSentence {
  std::string id;     // "ca01:12", the file and line
  std::string genre;  // brown_genres() name
  std::string text;   // brown_detokenize'd
  std::vector<BrownToken> tokens;
};

struct Brown {
  std::vector<BrownSentence> sentences;  // those short and plain enough for a prompt
  // word as written -> occurrences in the whole corpus: a name ("Susan") never counts as a common word.
  std::map<std::string, int64_t> count;
};

// Brown's tag (docs/data.md) coarsened to the classes the tasks ask for. Headlines (-hl), foreign words
// (fw-) and contractions (a "+" joins two tags) get none.
std::string coarse_class(const std::string& tag) {
  if (tag.find("-hl") != std::string::npos || tag.rfind("fw-", 0) == 0 || tag.find('+') != std::string::npos)
    return "";
  auto starts = [&](const char* p) { return tag.rfind(p, 0) == 0; };
  if (starts("nn")) return "noun";
  if (starts("np")) return "proper noun";
  // be, have and do forms and modals have tags of their own in Brown; they are verbs all the same.
  if (starts("vb") || starts("be") || starts("hv") || starts("do") || starts("md")) return "verb";
  if (starts("jj")) return "adjective";
  if (starts("rb")) return "adverb";
  if (starts("pp") || starts("pn")) return "pronoun";
  if (starts("in")) return "preposition";
  if (starts("at") || starts("dt")) return "determiner";
  if (starts("cc") || starts("cs")) return "conjunction";
  if (starts("cd")) return "number";
  return "";
}

std::string read_text(const fs::path& path, const char* hint) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path.string(), std::string("cannot open for reading; ") + hint);
  std::ostringstream os;
  os << in.rdbuf();
  if (in.bad()) throw FileError(path.string(), "read failed");
  return os.str();
}

Brown load_brown_sentences(const std::string& data_dir) {
  const fs::path dir = fs::path(data_dir) / "brown";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw FileError(dir.string(), std::string("no such folder; ") + kBrownHint);
  std::map<char, std::string> genre;
  for (const auto& [letter, name] : brown_genres()) genre[letter] = name;
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.size() == 4 && name[0] == 'c' && genre.count(name[1]) &&
        std::isdigit(static_cast<unsigned char>(name[2])) &&
        std::isdigit(static_cast<unsigned char>(name[3])))
      files.push_back(entry.path());
  }
  if (files.empty())
    throw FileError(dir.string(),
                    std::string("no Brown documents (ca01 .. cr09) in this folder; ") + kBrownHint);
  std::sort(files.begin(), files.end());

  Brown b;
  for (const auto& path : files) {
    const std::string name = path.filename().string();
    std::istringstream in(read_text(path, kBrownHint));
    int64_t line_no = 0;
    for (std::string line; std::getline(in, line);) {
      ++line_no;
      const auto raw = split_ws(line);
      if (raw.empty()) continue;
      BrownSentence s;
      s.id = name + ":" + std::to_string(line_no);
      s.genre = genre[name[1]];
      bool plain = raw.size() >= 6 && raw.size() <= 22;
      for (const auto& tok : raw) {
        const size_t slash = tok.rfind('/');
        if (slash == std::string::npos || slash == 0)
          throw FileError(path.string(),
                          "line " + std::to_string(line_no) + ": token '" + tok + "' is not word/tag");
        BrownToken t{tok.substr(0, slash), coarse_class(tok.substr(slash + 1))};
        ++b.count[t.word];
        if (tok.find("-hl") != std::string::npos) plain = false;  // headlines are not sentences
        s.tokens.push_back(std::move(t));
      }
      if (!plain) continue;
      s.text = brown_detokenize(line, path.string());
      // Shown inside double quotes in the prompt, so none inside it.
      if (s.text.size() > 160 || s.text.find('"') != std::string::npos) continue;
      b.sentences.push_back(std::move(s));
    }
  }
  return b;
}

// ------------------------------------------------------------------------------------------- WordNet

struct Pointer {
  std::string symbol;            // "!" antonym, "@" hypernym, ...
  uint64_t target;               // synset_key of the target
  int source_word, target_word;  // 1-based word numbers for lexical pointers, 0 for semantic ones
};

struct Synset {
  char pos;                        // the data file: 'n', 'v', 'a' (satellites too), 'r'
  std::vector<std::string> words;  // as written, adjective markers "(a)" "(p)" "(ip)" removed
  std::vector<Pointer> pointers;
  std::string definition;             // the gloss without its examples
  std::vector<std::string> examples;  // the gloss's "quoted" examples, quotes removed
};

struct IndexEntry {
  uint64_t first_sense = 0;  // synset_key of the most frequent sense (index files list senses by frequency)
  std::vector<uint64_t> senses;  // synset_keys of every sense, the most frequent first
  int64_t tagged_senses = 0;     // tagsense_cnt: senses seen in the semantic concordance (a common word)
};

struct WordNet {
  std::unordered_map<uint64_t, Synset> synsets;
  std::map<char, std::map<std::string, IndexEntry>> index;  // pos -> lemma -> entry
};

uint64_t synset_key(char pos, uint64_t offset) {
  return (static_cast<uint64_t>(pos == 's' ? 'a' : pos) << 40) | offset;
}

const std::vector<std::pair<char, std::string>>& wordnet_files() {
  static const std::vector<std::pair<char, std::string>> k = {
      {'n', "noun"}, {'v', "verb"}, {'a', "adj"}, {'r', "adv"}};
  return k;
}

std::string pos_name(char pos) {
  switch (pos) {
    case 'n':
      return "noun";
    case 'v':
      return "verb";
    case 'a':
      return "adjective";
    default:
      return "adverb";
  }
}

// A field of a WordNet line as a number in `base`, or a FileError naming the file and line.
uint64_t wn_number(const std::string& field, int base, const std::string& path, int64_t line) {
  try {
    size_t used = 0;
    const uint64_t v = std::stoull(field, &used, base);
    if (used == field.size()) return v;
  } catch (const std::exception&) {
  }
  throw FileError(path, "line " + std::to_string(line) + ": '" + field + "' is not a number");
}

void parse_data_file(const fs::path& path, char pos, WordNet& wn) {
  std::istringstream in(read_text(path, kWordNetHint));
  int64_t line_no = 0;
  const std::string where = path.string();
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty() || line[0] == ' ') continue;  // the licence header lines start with two spaces
    const size_t bar = line.find(" | ");
    if (bar == std::string::npos) throw FileError(where, "line " + std::to_string(line_no) + ": no gloss");
    const auto f = split_ws(line.substr(0, bar));
    auto need = [&](size_t n) {
      if (f.size() < n) throw FileError(where, "line " + std::to_string(line_no) + ": too few fields");
    };
    need(4);
    Synset s;
    s.pos = pos;
    const uint64_t offset = wn_number(f[0], 10, where, line_no);
    const size_t w_cnt = wn_number(f[3], 16, where, line_no);
    size_t at = 4;
    need(at + 2 * w_cnt + 1);
    for (size_t i = 0; i < w_cnt; ++i, at += 2) {
      std::string w = f[at];
      const size_t paren = w.find('(');
      if (paren != std::string::npos && w.back() == ')') w.erase(paren);
      s.words.push_back(w);
    }
    const size_t p_cnt = wn_number(f[at++], 10, where, line_no);
    need(at + 4 * p_cnt);
    for (size_t i = 0; i < p_cnt; ++i, at += 4) {
      const uint64_t st = wn_number(f[at + 3], 16, where, line_no);
      s.pointers.push_back(
          {f[at],
           synset_key(f[at + 2].empty() ? 'n' : f[at + 2][0], wn_number(f[at + 1], 10, where, line_no)),
           static_cast<int>(st >> 8), static_cast<int>(st & 0xff)});
    }
    // The gloss: a definition and examples, separated by "; ", each example in double quotes.
    std::string gloss = line.substr(bar + 3);
    while (!gloss.empty() && gloss.back() == ' ') gloss.pop_back();
    std::vector<std::string> definition;
    size_t start = 0;
    while (start < gloss.size()) {
      size_t end = gloss.find("; ", start);
      if (end == std::string::npos) end = gloss.size();
      std::string part = gloss.substr(start, end - start);
      while (!part.empty() && part.back() == ' ') part.pop_back();
      while (!part.empty() && part.front() == ' ') part.erase(part.begin());
      if (!part.empty() && part[0] == '"') {
        const size_t close = part.find('"', 1);
        if (close != std::string::npos && close > 1) s.examples.push_back(part.substr(1, close - 1));
      } else if (!part.empty()) {
        definition.push_back(part);
      }
      start = end + 2;
    }
    s.definition = join(definition, "; ");
    wn.synsets.emplace(synset_key(pos, offset), std::move(s));
  }
}

void parse_index_file(const fs::path& path, char pos, WordNet& wn) {
  std::istringstream in(read_text(path, kWordNetHint));
  int64_t line_no = 0;
  const std::string where = path.string();
  auto& index = wn.index[pos];
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty() || line[0] == ' ') continue;
    // lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
    const auto f = split_ws(line);
    if (f.size() < 4) throw FileError(where, "line " + std::to_string(line_no) + ": too few fields");
    const size_t synset_cnt = wn_number(f[2], 10, where, line_no);
    const size_t p_cnt = wn_number(f[3], 10, where, line_no);
    const size_t at = 4 + p_cnt;
    if (synset_cnt < 1 || f.size() < at + 2 + synset_cnt)
      throw FileError(where, "line " + std::to_string(line_no) + ": too few fields");
    IndexEntry e;
    for (size_t i = 0; i < synset_cnt; ++i)
      e.senses.push_back(synset_key(pos, wn_number(f[at + 2 + i], 10, where, line_no)));
    e.first_sense = e.senses.front();
    e.tagged_senses = static_cast<int64_t>(wn_number(f[at + 1], 10, where, line_no));
    index[f[0]] = std::move(e);
  }
}

WordNet load_wordnet(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw FileError(dir, std::string("no such folder; ") + kWordNetHint);
  WordNet wn;
  for (const auto& [pos, name] : wordnet_files()) {
    parse_data_file(fs::path(dir) / ("data." + name), pos, wn);
    parse_index_file(fs::path(dir) / ("index." + name), pos, wn);
  }
  return wn;
}

// ------------------------------------------------------------------------------------------ the pools

struct Sources {
  const DataConfig* cfg = nullptr;
  Brown brown;
  std::vector<std::string> common_words;  // Brown words for the generated tasks, sorted
  std::optional<WordNet> wordnet;
  // A word the lexical tasks may ask about or answer: one lowercase word Brown uses at least 3 times.
  bool plain_word(const std::string& w) const {
    if (!is_lower_word(w) || w.size() < 3 || w.size() > 14) return false;
    auto it = brown.count.find(w);
    return it != brown.count.end() && it->second >= 3;
  }
  std::vector<std::string> plain_words(const Synset& s) const {
    std::vector<std::string> out;
    for (const auto& w : s.words)
      if (plain_word(w) && std::find(out.begin(), out.end(), w) == out.end()) out.push_back(w);
    return out;
  }
};

// The per-item generator: seeded by the task and the item, so a pool does not depend on the order its
// items were found in.
std::mt19937_64 item_rng(const std::string& task, const std::string& item, uint64_t seed) {
  return std::mt19937_64(fnv1a64(task + '\x1f' + item, seed));
}

InstructSample make_sample(const TaskSpec& spec, std::mt19937_64& rng, std::string key,
                           const std::map<std::string, std::string>& slots,
                           std::vector<std::string> answers) {
  InstructSample s;
  s.task = spec.info.name;
  s.prompt = fill(spec.templates[draw(rng, spec.templates.size())], slots);
  s.response = answers.front();
  s.answers = std::move(answers);
  s.key = std::move(key);
  return s;
}

// Every sample a source task can make, one per key, in key order.
std::vector<InstructSample> source_pool(const TaskSpec& spec, const Sources& src, uint64_t seed) {
  const std::string& task = spec.info.name;
  std::map<std::string, InstructSample> pool;
  auto add = [&](InstructSample s) {
    std::string key = s.key;
    pool.emplace(std::move(key), std::move(s));
  };
  if (spec.info.source == "brown") {
    std::string genres;
    for (const auto& [letter, name] : brown_genres()) {
      std::string shown = name;
      std::replace(shown.begin(), shown.end(), '_', ' ');
      genres += (genres.empty() ? "" : ", ") + shown;
    }
    for (const auto& s : src.brown.sentences) {
      auto rng = item_rng(task, s.id, seed);
      if (task == "genre") {
        std::string answer = s.genre;
        std::replace(answer.begin(), answer.end(), '_', ' ');
        add(make_sample(spec, rng, s.id, {{"s", s.text}, {"o", genres}}, {answer}));
        continue;
      }
      if (task == "pos_tag") {
        // A class first, uniformly over those the sentence has, so that nouns do not dominate the answers;
        // then a word of it that occurs once in the sentence (the question must name one token).
        std::map<std::string, int64_t> seen;
        for (const auto& t : s.tokens) ++seen[lower(t.word)];
        std::map<std::string, std::vector<size_t>> by_class;
        for (size_t i = 0; i < s.tokens.size(); ++i)
          if (!s.tokens[i].cls.empty() && is_letters(s.tokens[i].word) && seen[lower(s.tokens[i].word)] == 1)
            by_class[s.tokens[i].cls].push_back(i);
        if (by_class.empty()) continue;
        auto cls = std::next(by_class.begin(), static_cast<std::ptrdiff_t>(draw(rng, by_class.size())));
        const auto& tok = s.tokens[cls->second[draw(rng, cls->second.size())]];
        add(make_sample(spec, rng, s.id, {{"s", s.text}, {"w", tok.word}}, {cls->first}));
        continue;
      }
      // first_of_pos: one of the four open classes the sentence has; its first word must be a plain word.
      std::vector<std::pair<std::string, std::string>> firsts;
      for (const char* cls : {"noun", "verb", "adjective", "adverb"})
        for (const auto& t : s.tokens)
          if (t.cls == cls) {
            if (is_letters(t.word)) firsts.emplace_back(cls, t.word);
            break;
          }
      if (firsts.empty()) continue;
      const auto& [cls, word] = firsts[draw(rng, firsts.size())];
      add(make_sample(spec, rng, s.id + "/" + cls, {{"s", s.text}, {"c", cls}}, {word}));
    }
  } else {
    const WordNet& wn = *src.wordnet;
    auto synset = [&](uint64_t key) -> const Synset* {
      auto it = wn.synsets.find(key);
      return it == wn.synsets.end() ? nullptr : &it->second;
    };
    if (task == "fill_blank") {
      // In key order: two synsets may share an example, and the first one's word is kept.
      std::vector<uint64_t> keys;
      for (const auto& kv : wn.synsets) keys.push_back(kv.first);
      std::sort(keys.begin(), keys.end());
      for (uint64_t k : keys) {
        const Synset& s = wn.synsets.at(k);
        for (const auto& w : src.plain_words(s))
          for (const auto& e : s.examples) {
            // The word exactly once, as a whole word, in the example.
            auto words = split_ws(e);
            int64_t hits = 0;
            for (auto& x : words) {
              std::string bare = x;
              while (!bare.empty() && std::ispunct(static_cast<unsigned char>(bare.back()))) bare.pop_back();
              if (lower(bare) == w) {
                ++hits;
                x = "___" + x.substr(bare.size());
              }
            }
            if (hits != 1 || words.size() < 4) continue;
            const std::string blanked = join(words);
            if (blanked.find('"') != std::string::npos || blanked.size() > 160) continue;
            auto rng = item_rng(task, blanked, seed);
            add(make_sample(spec, rng, blanked, {{"e", blanked}}, {w}));
          }
      }
    } else {
      // The other lexical tasks ask about a lemma, by its most frequent sense; lemmas the semantic
      // concordance never saw are too rare to ask about.
      std::set<std::string> in_several;  // word_class: lemmas listed under more than one part of speech
      std::map<std::string, int> listed;
      for (const auto& [pos, lemmas] : wn.index)
        for (const auto& [lemma, e] : lemmas) ++listed[lemma];
      std::set<uint64_t> defined;  // define: one sample per synset
      for (const auto& [pos, lemmas] : wn.index) {
        for (const auto& [lemma, e] : lemmas) {
          if (e.tagged_senses < 1 || !src.plain_word(lemma)) continue;
          const Synset* s = synset(e.first_sense);
          // Index lemmas are lowercased; the synset spells a name with capitals ("Wyoming"), and names
          // are left out.
          if (!s || std::find(s->words.begin(), s->words.end(), lemma) == s->words.end()) continue;
          auto rng = item_rng(task, std::string(1, pos) + ":" + lemma, seed);
          if (task == "word_class") {
            if (listed[lemma] == 1) add(make_sample(spec, rng, lemma, {{"w", lemma}}, {pos_name(pos)}));
          } else if (task == "define") {
            const auto& d = s->definition;
            const auto dw = split_ws(lower(d));
            if (d.empty() || d.size() > 160 || d.find('"') != std::string::npos ||
                std::find(dw.begin(), dw.end(), lemma) != dw.end() || !defined.insert(e.first_sense).second)
              continue;
            auto answers = src.plain_words(*s);
            answers.erase(std::remove(answers.begin(), answers.end(), lemma), answers.end());
            answers.insert(answers.begin(), lemma);
            add(make_sample(spec, rng, std::to_string(e.first_sense), {{"p", pos_name(pos)}, {"d", d}},
                            answers));
          } else if (task == "synonym") {
            auto answers = src.plain_words(*s);
            answers.erase(std::remove(answers.begin(), answers.end(), lemma), answers.end());
            if (!answers.empty() && !pool.count(lemma))
              add(make_sample(spec, rng, lemma, {{"w", lemma}}, answers));
          } else if (task == "hypernym") {
            if (pos != 'n') continue;
            std::vector<std::string> answers;
            for (const auto& p : s->pointers)
              if (p.symbol == "@")
                if (const Synset* h = synset(p.target))
                  for (const auto& w : src.plain_words(*h))
                    if (w != lemma && std::find(answers.begin(), answers.end(), w) == answers.end())
                      answers.push_back(w);
            if (!answers.empty()) add(make_sample(spec, rng, lemma, {{"w", lemma}}, answers));
          } else if (task == "antonym") {
            // Antonymy is between words (a lexical pointer): the lemma's own word number in its synset.
            std::vector<std::string> answers;
            // Any sense of the lemma in this part of speech, the most frequent first.
            for (uint64_t sense : e.senses) {
              const Synset* syn = synset(sense);
              if (!syn) continue;
              for (const auto& p : syn->pointers) {
                if (p.symbol != "!" || p.source_word < 1 || size_t(p.source_word) > syn->words.size() ||
                    syn->words[p.source_word - 1] != lemma)
                  continue;
                const Synset* t = synset(p.target);
                if (!t || p.target_word < 1 || size_t(p.target_word) > t->words.size()) continue;
                const std::string& a = t->words[p.target_word - 1];
                if (src.plain_word(a) && std::find(answers.begin(), answers.end(), a) == answers.end())
                  answers.push_back(a);
              }
            }
            if (!answers.empty() && !pool.count(lemma))
              add(make_sample(spec, rng, lemma, {{"w", lemma}}, answers));
          }
        }
      }
    }
  }
  std::vector<InstructSample> out;
  out.reserve(pool.size());
  for (auto& [key, s] : pool) out.push_back(std::move(s));
  return out;
}

// `need` distinct samples of a generated task, drawn in order from the task's generator (or fewer, when
// its inputs run out).
std::vector<InstructSample> generated_pool(const TaskSpec& spec, const Sources& src, uint64_t seed,
                                           size_t need) {
  const std::string& task = spec.info.name;
  std::mt19937_64 rng(fnv1a64(task, seed));
  std::set<std::string> keys;
  std::vector<InstructSample> out;
  const auto& words = src.common_words;
  for (size_t attempt = 0; out.size() < need && attempt < 50 * need + 1000; ++attempt) {
    if (task == "add" || task == "subtract") {
      int64_t a = static_cast<int64_t>(draw(rng, 100)), b = static_cast<int64_t>(draw(rng, 100));
      if (task == "subtract" && a < b) std::swap(a, b);
      const std::string key = std::to_string(a) + (task == "add" ? "+" : "-") + std::to_string(b);
      const int64_t r = task == "add" ? a + b : a - b;
      InstructSample s =
          make_sample(spec, rng, key, {{"a", number_words(a)}, {"b", number_words(b)}}, {number_words(r)});
      if (keys.insert(key).second) out.push_back(std::move(s));
      continue;
    }
    const size_t lo = task == "count_words" ? 2 : task == "copy_upper" ? 2 : 3;
    const size_t hi = task == "count_words" ? 12 : task == "sort_words" ? 6 : task == "copy_upper" ? 5 : 7;
    const size_t n = lo + draw(rng, hi - lo + 1);
    std::vector<std::string> list;
    while (list.size() < n) {
      const std::string& w = words[draw(rng, words.size())];
      // Distinct words: a sorted or reversed list then has one right answer.
      if (std::find(list.begin(), list.end(), w) == list.end()) list.push_back(w);
    }
    const std::string shown = join(list);
    std::string answer;
    if (task == "reverse_words") {
      answer = join(std::vector<std::string>(list.rbegin(), list.rend()));
    } else if (task == "sort_words") {
      auto sorted = list;
      std::sort(sorted.begin(), sorted.end());
      answer = join(sorted);
    } else if (task == "count_words") {
      answer = number_words(static_cast<int64_t>(n));
    } else {
      answer = upper(shown);
    }
    InstructSample s = make_sample(spec, rng, shown, {{"l", shown}}, {answer});
    if (keys.insert(shown).second) out.push_back(std::move(s));
  }
  return out;
}

}  // namespace

const std::vector<InstructTask>& instruct_tasks() {
  static const std::vector<InstructTask> k = [] {
    std::vector<InstructTask> out;
    for (const auto& s : task_specs()) out.push_back(s.info);
    return out;
  }();
  return k;
}

void check_instruct_tasks(const DataConfig& cfg) {
  if (cfg.instruct_tasks.empty())
    throw ConfigError("data.instruct_tasks",
                      "is empty; name at least one task (known: " + task_names() + ")");
  std::set<std::string> tasks;
  for (const auto& t : cfg.instruct_tasks) {
    if (!find_spec(t))
      throw ConfigError("data.instruct_tasks", "unknown task '" + t + "' (known: " + task_names() + ")");
    if (!tasks.insert(t).second) throw ConfigError("data.instruct_tasks", "names task '" + t + "' twice");
  }
  std::set<std::string> heldout;
  for (const auto& t : cfg.instruct_heldout) {
    if (!find_spec(t))
      throw ConfigError("data.instruct_heldout", "unknown task '" + t + "' (known: " + task_names() + ")");
    if (!tasks.count(t))
      throw ConfigError("data.instruct_heldout",
                        "holds out '" + t + "', which data.instruct_tasks does not list");
    heldout.insert(t);
  }
  if (heldout.size() == tasks.size())
    throw ConfigError("data.instruct_heldout", "holds out every task, leaving nothing to train on");
}

InstructData generate_instruct(const DataConfig& cfg) {
  check_instruct_tasks(cfg);
  Sources src;
  src.cfg = &cfg;
  src.brown = load_brown_sentences(cfg.dir);
  for (const auto& [w, n] : src.brown.count)
    if (n >= 20 && is_lower_word(w) && w.size() >= 3 && w.size() <= 10) src.common_words.push_back(w);
  bool lexical = false;
  for (const auto& t : cfg.instruct_tasks) lexical |= find_spec(t)->info.source == "wordnet";
  if (lexical) src.wordnet = load_wordnet(cfg.wordnet_dir);

  InstructData data;
  data.tasks = cfg.instruct_tasks;
  data.heldout = cfg.instruct_heldout;
  const uint64_t seed = static_cast<uint64_t>(cfg.seed);
  const size_t n_eval = static_cast<size_t>(cfg.instruct_eval_per_task);
  const size_t n_train = static_cast<size_t>(cfg.instruct_train_per_task);
  for (const auto& task : cfg.instruct_tasks) {
    const TaskSpec& spec = *find_spec(task);
    const bool held = std::count(cfg.instruct_heldout.begin(), cfg.instruct_heldout.end(), task) > 0;
    const size_t need = held ? n_eval : 2 * n_eval + n_train;
    std::vector<InstructSample> pool;
    if (spec.info.source == "generated") {
      pool = generated_pool(spec, src, seed, need);
    } else {
      auto all = source_pool(spec, src, seed);
      const auto perm = seeded_permutation(static_cast<int64_t>(all.size()), fnv1a64(task, seed));
      for (size_t i = 0; i < std::min(need, all.size()); ++i) pool.push_back(std::move(all[perm[i]]));
    }
    if (pool.size() < need)
      throw ConfigError("data.instruct_train_per_task",
                        "task '" + task + "' has only " + std::to_string(pool.size()) +
                            " distinct inputs, fewer than the " + std::to_string(need) + " asked for (" +
                            (held ? "data.instruct_eval_per_task"
                                  : "2 x data.instruct_eval_per_task + data.instruct_train_per_task") +
                            "); ask for fewer samples or leave the task out of data.instruct_tasks");
    for (size_t i = 0; i < pool.size(); ++i) {
      auto& to = i < n_eval ? data.test : i < 2 * n_eval ? data.validation : data.train;
      to.push_back(std::move(pool[i]));
    }
  }
  return data;
}

CorpusSplit instruct_corpus_split(const InstructData& data, const DataConfig& cfg) {
  CorpusSplit split;
  split.domains = data.tasks;
  std::sort(split.domains.begin(), split.domains.end());
  auto docs = [](const std::vector<InstructSample>& samples, const std::string& part,
                 const std::function<bool(const InstructSample&)>& keep) {
    std::vector<Document> out;
    std::map<std::string, int64_t> index;
    for (const auto& s : samples) {
      const int64_t i = index[s.task]++;
      if (keep(s))
        out.push_back({part + "/" + s.task + "/" + std::to_string(i), s.task, s.prompt + " " + s.response});
    }
    return out;
  };
  auto all = [](const InstructSample&) { return true; };
  split.train = docs(data.train, "train", all);
  split.validation = docs(data.validation, "validation", all);
  split.heldout = docs(data.test, "test", [&](const InstructSample& s) {
    return std::count(data.heldout.begin(), data.heldout.end(), s.task) > 0;
  });
  DataConfig brown = cfg;
  brown.corpus = "brown";
  for (auto& d : load_corpus(brown)) split.tokenizer_extra.push_back(std::move(d.text));
  return split;
}

}  // namespace moeforge
