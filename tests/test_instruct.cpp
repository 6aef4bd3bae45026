// Instruction data (docs/instruct-data.md): the generator is deterministic and its splits disjoint, every
// task makes samples, packing keeps samples whole and scores only their responses, the weighted loss and
// its gradient are those of the masked computation, and bad input names the key, folder or file.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "moeforge/data/data.h"
#include "moeforge/data/instruct.h"
#include "moeforge/data/prepare.h"
#include "moeforge/experiments/instruct_eval.h"
#include "moeforge/model/load.h"
#include "moeforge/model/transformer.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

using ::moeforge::test::expect_config_error;

// The Brown corpus (scripts/install-deps.sh, git-ignored data/) and WordNet (Debian's wordnet-base).
std::string brown_data_dir() {
  return std::string(MOEFORGE_SOURCE_DIR) + "/data";
}
const char* kWordNet = "/usr/share/wordnet";
bool have_sources() {
  return fs::is_directory(brown_data_dir() + "/brown") && fs::exists(std::string(kWordNet) + "/data.noun");
}
#define SKIP_WITHOUT_SOURCES()                                 \
  if (!have_sources())                                         \
  GTEST_SKIP() << brown_data_dir() << "/brown or " << kWordNet \
               << " is missing: run scripts/install-deps.sh (Brown corpus, Debian's wordnet-base)"

std::string tmp_dir(const std::string& name) {
  const auto dir =
      fs::path(::testing::TempDir()) / ("moeforge_instruct_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

DataConfig small_config() {
  DataConfig cfg;
  cfg.corpus = "instruct";
  cfg.dir = brown_data_dir();
  cfg.wordnet_dir = kWordNet;
  cfg.instruct_train_per_task = 40;
  cfg.instruct_eval_per_task = 10;
  return cfg;
}

// One generation with small_config(), shared by the tests that only read it.
const InstructData& small_data() {
  static const InstructData data = generate_instruct(small_config());
  return data;
}

std::vector<std::string> describe(const std::vector<InstructSample>& v) {
  std::vector<std::string> out;
  for (const auto& s : v) out.push_back(s.task + "|" + s.key + "|" + s.prompt + "|" + s.response);
  return out;
}

bool is_heldout(const InstructData& d, const std::string& task) {
  return std::count(d.heldout.begin(), d.heldout.end(), task) > 0;
}

TEST(InstructConfig, TaskListsAreCheckedAndNamed) {
  DataConfig cfg = small_config();
  EXPECT_NO_THROW(cfg.validate());
  EXPECT_GE(cfg.instruct_tasks.size(), 12u);
  EXPECT_GE(cfg.instruct_heldout.size(), 3u);
  auto with = [&](auto change) {
    DataConfig c = cfg;
    change(c);
    return [c] { c.validate(); };
  };
  expect_config_error(with([](DataConfig& c) { c.instruct_tasks = {}; }), "data.instruct_tasks");
  expect_config_error(with([](DataConfig& c) { c.instruct_tasks.push_back("add"); }), "data.instruct_tasks");
  expect_config_error(with([](DataConfig& c) { c.instruct_heldout = {"telepathy"}; }),
                      "data.instruct_heldout");
  expect_config_error(with([](DataConfig& c) {
                        c.instruct_tasks = {"add", "subtract"};
                        c.instruct_heldout = {"antonym"};  // known, but not in the list
                      }),
                      "data.instruct_heldout");
  expect_config_error(with([](DataConfig& c) {
                        c.instruct_tasks = {"add", "subtract"};
                        c.instruct_heldout = {"add", "subtract"};
                      }),
                      "data.instruct_heldout");
  expect_config_error(with([](DataConfig& c) { c.heldout_genres = {"humor"}; }), "data.heldout_genres");
  expect_config_error(with([](DataConfig& c) { c.instruct_train_per_task = 0; }),
                      "data.instruct_train_per_task");
  expect_config_error(with([](DataConfig& c) { c.instruct_eval_per_task = 0; }),
                      "data.instruct_eval_per_task");
  expect_config_error(with([](DataConfig& c) { c.wordnet_dir = ""; }), "data.wordnet_dir");

  // The generator checks too (it may be called without validate()), and names the unknown task.
  DataConfig bad = cfg;
  bad.instruct_tasks = {"add", "telepathy"};
  bad.instruct_heldout = {};
  try {
    generate_instruct(bad);
    ADD_FAILURE() << "no error for an unknown task";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "data.instruct_tasks");
    EXPECT_NE(std::string(e.what()).find("'telepathy'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("synonym"), std::string::npos) << e.what();  // lists the known ones
  }
  bad.instruct_tasks = {};
  expect_config_error([&] { generate_instruct(bad); }, "data.instruct_tasks");
}

TEST(InstructConfig, TomlKeys) {
  RunConfig cfg = load_run_config_text(
      "[data]\ncorpus = \"instruct\"\ninstruct_tasks = [\"add\", \"subtract\", \"reverse_words\"]\n"
      "instruct_heldout = [\"subtract\"]\ninstruct_train_per_task = 7\ninstruct_pack = false\n",
      "test.toml");
  EXPECT_EQ(cfg.data.corpus, "instruct");
  EXPECT_EQ(cfg.data.instruct_tasks, (std::vector<std::string>{"add", "subtract", "reverse_words"}));
  EXPECT_EQ(cfg.data.instruct_heldout, (std::vector<std::string>{"subtract"}));
  EXPECT_EQ(cfg.data.instruct_train_per_task, 7);
  EXPECT_FALSE(cfg.data.instruct_pack);
  // Written back and read again unchanged (checkpoints store the config as TOML).
  const auto again = load_run_config_text(cfg.to_toml(), "again.toml");
  EXPECT_EQ(again.data.instruct_tasks, cfg.data.instruct_tasks);
  EXPECT_EQ(again.data.instruct_heldout, cfg.data.instruct_heldout);
  EXPECT_EQ(again.data.wordnet_dir, cfg.data.wordnet_dir);
}

TEST(InstructSources, MissingFoldersAndFilesAreNamed) {
  DataConfig cfg = small_config();
  cfg.dir = tmp_dir("nobrown") + "/nowhere";
  try {
    generate_instruct(cfg);
    ADD_FAILURE() << "no error for a missing Brown folder";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), cfg.dir + "/brown");
    EXPECT_NE(std::string(e.what()).find("install-deps.sh"), std::string::npos) << e.what();
  }
  if (!have_sources()) GTEST_SKIP() << "the WordNet half needs the Brown corpus";
  cfg = small_config();
  cfg.wordnet_dir = tmp_dir("nowordnet") + "/nowhere";
  try {
    generate_instruct(cfg);
    ADD_FAILURE() << "no error for a missing WordNet folder";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), cfg.wordnet_dir);
    EXPECT_NE(std::string(e.what()).find("wordnet-base"), std::string::npos) << e.what();
  }
  // A folder without the data files names the first one missing.
  cfg.wordnet_dir = tmp_dir("emptywordnet");
  try {
    generate_instruct(cfg);
    ADD_FAILURE() << "no error for a WordNet folder without data files";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), (fs::path(cfg.wordnet_dir) / "data.noun").string());
  }
  // Tasks that need no WordNet do not read it.
  cfg.instruct_tasks = {"add", "reverse_words"};
  cfg.instruct_heldout = {"reverse_words"};
  EXPECT_NO_THROW(generate_instruct(cfg));
  // A damaged data line names the file and line.
  const auto broken = tmp_dir("brokenwordnet");
  for (const char* f : {"data.noun", "index.noun", "data.verb", "index.verb", "data.adj", "index.adj",
                        "data.adv", "index.adv"})
    fs::copy_file(std::string(kWordNet) + "/" + f, fs::path(broken) / f);
  std::ofstream(fs::path(broken) / "data.adv", std::ios::app) << "00099999 02 r zz | broken\n";
  cfg = small_config();
  cfg.wordnet_dir = broken;
  try {
    generate_instruct(cfg);
    ADD_FAILURE() << "no error for a damaged data line";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), (fs::path(broken) / "data.adv").string());
    EXPECT_NE(std::string(e.what()).find("line "), std::string::npos) << e.what();
  }
}

TEST(InstructSources, TooFewInputsNameTheTask) {
  SKIP_WITHOUT_SOURCES();
  DataConfig cfg = small_config();
  cfg.instruct_tasks = {"subtract", "add"};
  cfg.instruct_heldout = {};
  cfg.instruct_train_per_task = 6000;  // subtract has 100 * 101 / 2 = 5050 distinct inputs
  try {
    generate_instruct(cfg);
    ADD_FAILURE() << "no error for a task with too few inputs";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "data.instruct_train_per_task");
    EXPECT_NE(std::string(e.what()).find("'subtract' has only 5050"), std::string::npos) << e.what();
  }
}

TEST(InstructData, EveryTaskMakesSamplesAndSplitsAreDisjoint) {
  SKIP_WITHOUT_SOURCES();
  const auto& d = small_data();
  const auto cfg = small_config();
  ASSERT_EQ(d.tasks, cfg.instruct_tasks);
  std::map<std::string, std::map<std::string, int>> counts;  // task -> split -> samples
  std::map<std::string, std::map<std::string, std::string>> key_split;
  for (const auto& [name, part] : std::vector<std::pair<std::string, const std::vector<InstructSample>*>>{
           {"train", &d.train}, {"validation", &d.validation}, {"test", &d.test}}) {
    for (const auto& s : *part) {
      ++counts[s.task][name];
      // A key is in one split only, within its task: no test sample is trained on.
      auto [it, fresh] = key_split[s.task].emplace(s.key, name);
      EXPECT_TRUE(fresh) << s.task << " key '" << s.key << "' in " << it->second << " and " << name;
      ASSERT_FALSE(s.response.empty()) << s.task << " " << s.key;
      ASSERT_FALSE(s.answers.empty());
      EXPECT_EQ(s.answers.front(), s.response);
      ASSERT_GE(s.prompt.size(), 8u);
      EXPECT_EQ(s.prompt.substr(s.prompt.size() - 7), "Answer:") << s.prompt;
      EXPECT_EQ(s.prompt.find('{'), std::string::npos) << "unfilled slot: " << s.prompt;
      EXPECT_EQ(s.prompt.find('\n'), std::string::npos) << s.prompt;  // the tokenizer's text has none
    }
  }
  std::set<std::string> families_trained, families_heldout;
  for (const auto& t : instruct_tasks())
    (is_heldout(d, t.name) ? families_heldout : families_trained).insert(t.family);
  for (const auto& task : d.tasks) {
    SCOPED_TRACE(task);
    if (is_heldout(d, task)) {
      EXPECT_EQ(counts[task]["train"], 0);  // no held-out task in training, nor in validation
      EXPECT_EQ(counts[task]["validation"], 0);
      EXPECT_EQ(counts[task]["test"], 10);
    } else {
      EXPECT_EQ(counts[task]["train"], 40);
      EXPECT_EQ(counts[task]["validation"], 10);
      EXPECT_EQ(counts[task]["test"], 10);
    }
  }
  // Each held-out task has a family that training sees.
  for (const auto& f : families_heldout) EXPECT_TRUE(families_trained.count(f)) << f;
  // Several phrasings per task are in use.
  std::map<std::string, std::set<std::string>> openings;
  for (const auto& s : d.train) openings[s.task].insert(s.prompt.substr(0, 12));
  for (const auto& [task, o] : openings) EXPECT_GE(o.size(), 2u) << task;
}

TEST(InstructData, AnswersFollowTheirRule) {
  SKIP_WITHOUT_SOURCES();
  const auto& d = small_data();
  auto words = [](const std::string& s) {
    std::istringstream in(s);
    std::vector<std::string> w;
    for (std::string x; in >> x;) w.push_back(x);
    return w;
  };
  auto quoted = [](const std::string& prompt) {  // the text between the first pair of double quotes
    const size_t a = prompt.find('"'), b = prompt.find('"', a + 1);
    return prompt.substr(a + 1, b - a - 1);
  };
  int checked = 0;
  for (const auto* part : {&d.train, &d.test}) {
    for (const auto& s : *part) {
      SCOPED_TRACE(s.prompt + " -> " + s.response);
      if (s.task == "sort_words") {
        auto w = words(quoted(s.prompt));
        std::sort(w.begin(), w.end());
        EXPECT_EQ(words(s.response), w);
      } else if (s.task == "reverse_words") {
        auto w = words(quoted(s.prompt));
        std::reverse(w.begin(), w.end());
        EXPECT_EQ(words(s.response), w);
      } else if (s.task == "count_words") {
        const auto n = words(quoted(s.prompt)).size();
        const std::vector<std::string> names = {"zero",  "one",   "two",  "three", "four",   "five",  "six",
                                                "seven", "eight", "nine", "ten",   "eleven", "twelve"};
        ASSERT_LT(n, names.size());
        EXPECT_EQ(s.response, names[n]);
      } else if (s.task == "copy_upper") {
        std::string up = quoted(s.prompt);
        for (auto& c : up) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        EXPECT_EQ(s.response, up);
      } else if (s.task == "fill_blank") {
        EXPECT_NE(s.prompt.find("___"), std::string::npos);
      } else if (s.task == "pos_tag" || s.task == "first_of_pos" || s.task == "genre") {
        EXPECT_NE(quoted(s.prompt).size(), 0u);
      } else {
        continue;
      }
      ++checked;
    }
  }
  EXPECT_GT(checked, 100);
  // Arithmetic: every sample's answer, against numbers written out here independently.
  const std::vector<std::string> ones = {"zero",    "one",     "two",       "three",    "four",
                                         "five",    "six",     "seven",     "eight",    "nine",
                                         "ten",     "eleven",  "twelve",    "thirteen", "fourteen",
                                         "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"};
  const std::vector<std::string> tens = {"",      "",      "twenty",  "thirty", "forty",
                                         "fifty", "sixty", "seventy", "eighty", "ninety"};
  auto below_100 = [&](int n) {
    return n < 20 ? ones[size_t(n)] : tens[size_t(n / 10)] + (n % 10 ? "-" + ones[size_t(n % 10)] : "");
  };
  auto in_words = [&](int n) {
    return n < 100 ? below_100(n) : "one hundred" + (n % 100 ? " and " + below_100(n % 100) : std::string());
  };
  EXPECT_EQ(in_words(126), "one hundred and twenty-six");
  int sums = 0;
  for (const auto* part : {&d.train, &d.validation, &d.test}) {
    for (const auto& s : *part) {
      if (s.task != "add" && s.task != "subtract") continue;
      const auto op = s.key.find(s.task == "add" ? '+' : '-');
      const int a = std::stoi(s.key.substr(0, op)), b = std::stoi(s.key.substr(op + 1));
      EXPECT_EQ(s.response, in_words(s.task == "add" ? a + b : a - b)) << s.key;
      EXPECT_NE(s.prompt.find(in_words(a)), std::string::npos) << s.prompt;
      EXPECT_NE(s.prompt.find(in_words(b)), std::string::npos) << s.prompt;
      ++sums;
    }
  }
  EXPECT_EQ(sums, 2 * 60);
}

TEST(InstructData, DeterministicForASeedAndTasksIndependent) {
  SKIP_WITHOUT_SOURCES();
  const auto& d = small_data();
  const auto again = generate_instruct(small_config());
  EXPECT_EQ(describe(again.train), describe(d.train));
  EXPECT_EQ(describe(again.validation), describe(d.validation));
  EXPECT_EQ(describe(again.test), describe(d.test));
  // Another seed draws other samples.
  DataConfig other = small_config();
  other.seed = 99;
  other.instruct_tasks = {"synonym", "pos_tag", "add"};
  other.instruct_heldout = {"add"};
  const auto o = generate_instruct(other);
  // A task's samples do not depend on which other tasks are asked for, nor on their order.
  DataConfig subset = small_config();
  subset.instruct_tasks = {"add", "synonym", "pos_tag"};
  subset.instruct_heldout = {};
  const auto sub = generate_instruct(subset);
  auto of_task = [](const std::vector<InstructSample>& v, const std::string& task) {
    std::vector<InstructSample> out;
    for (const auto& s : v)
      if (s.task == task) out.push_back(s);
    return describe(out);
  };
  for (const char* task : {"synonym", "pos_tag", "add"}) {
    SCOPED_TRACE(task);
    EXPECT_EQ(of_task(sub.train, task), of_task(d.train, task));
    EXPECT_EQ(of_task(sub.test, task), of_task(d.test, task));
    EXPECT_NE(of_task(o.test, task), of_task(d.test, task));
  }
}

TEST(InstructData, CorpusSplitForTheTokenizer) {
  SKIP_WITHOUT_SOURCES();
  const auto& d = small_data();
  const auto split = instruct_corpus_split(d, small_config());
  auto sorted = d.tasks;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(split.domains, sorted);
  EXPECT_EQ(split.train.size(), d.train.size());
  EXPECT_EQ(split.validation.size(), d.validation.size());
  EXPECT_EQ(split.heldout.size(), 10 * d.heldout.size());  // the held-out tasks' test samples
  for (const auto& doc : split.heldout) EXPECT_TRUE(is_heldout(d, doc.domain)) << doc.id;
  EXPECT_EQ(split.train.front().text, d.train.front().prompt + " " + d.train.front().response);
  EXPECT_EQ(split.tokenizer_extra.size(), 500u);  // the Brown documents
}

// ---------------------------------------------------------------------------------------------- packing

const Tokenizer& small_tokenizer() {
  static const Tokenizer tok = [] {
    std::vector<std::string> texts;
    for (int i = 0; i < 30; ++i)
      texts.push_back(
          "Reverse the words: \"cat dog bird\" Answer: bird dog cat. Add two and three. Answer: five " +
          std::to_string(i));
    return Tokenizer::train(texts, 120, 1);
  }();
  return tok;
}

std::vector<int64_t> sample_ids(const Tokenizer& tok, const InstructSample& s, int64_t* n_prompt) {
  std::vector<int64_t> ids = {tok.bos_id()};
  for (auto id : tok.encode(s.prompt)) ids.push_back(id);
  *n_prompt = static_cast<int64_t>(ids.size());
  for (auto id : tok.encode(s.response)) ids.push_back(id);
  ids.push_back(tok.eos_id());
  return ids;
}

std::vector<InstructSample> packing_samples() {
  std::vector<InstructSample> v;
  const std::vector<std::string> words = {"cat", "dog", "bird", "cat dog", "bird cat dog"};
  for (int i = 0; i < 12; ++i) {
    const std::string task = i < 7 ? "rev" : "add";
    const std::string w = words[size_t(i) % words.size()];
    v.push_back({task,
                 task == "rev" ? "Reverse the words: \"" + w + "\" Answer:" : "Add two and three. Answer:",
                 task == "rev" ? w : "five",
                 {},
                 std::to_string(i)});
  }
  // Longer than any row: left out whole, never cut.
  v.push_back({"add",
               "Add two and three and two and three and two and three and two and three. Answer:",
               "five five five five five five",
               {},
               "long"});
  return v;
}

// Walks the rows: each sample must be found whole, in order, at the start of a row or right after the
// previous sample of the same row; its response targets weigh 1, everything else 0; the rest is padding.
void check_packing(const PackedData& p, const std::vector<InstructSample>& samples, const Tokenizer& tok,
                   int64_t seq_len, bool pack) {
  ASSERT_TRUE(p.weight.defined());
  ASSERT_EQ(p.weight.sizes(), torch::IntArrayRef({p.size(), seq_len}));
  ASSERT_EQ(p.tokens.size(1), seq_len + 1);
  auto tokens = p.tokens.contiguous();
  auto weight = p.weight.contiguous();
  const int64_t* t = tokens.data_ptr<int64_t>();
  const float* w = weight.data_ptr<float>();
  int64_t row = 0, pos = 0, kept = 0, dropped = 0;
  std::vector<float> expect_w(size_t(p.size() * seq_len), 0.0f);
  std::vector<int64_t> samples_in_row(size_t(p.size()), 0);
  for (const auto& s : samples) {
    int64_t n_prompt = 0;
    const auto ids = sample_ids(tok, s, &n_prompt);
    const int64_t len = int64_t(ids.size());
    if (len > seq_len + 1) {
      ++dropped;
      continue;
    }
    // Same row when packing and it fits and the row is of the same task; else the next row.
    const bool same_row = pack && pos > 0 && pos + len <= seq_len + 1 &&
                          p.domain[row].item<int64_t>() == domain_id(p.domains, s.task);
    if (!same_row && pos > 0) ++row, pos = 0;
    ASSERT_LT(row, p.size()) << "sample " << s.key << " is not in the packed rows";
    EXPECT_EQ(p.domain[row].item<int64_t>(), domain_id(p.domains, s.task));
    for (int64_t k = 0; k < len; ++k)
      ASSERT_EQ(t[row * (seq_len + 1) + pos + k], ids[size_t(k)]) << "sample " << s.key << " token " << k;
    for (int64_t k = n_prompt; k < len; ++k) expect_w[size_t(row * seq_len + pos + k - 1)] = 1.0f;
    pos += len;
    ++kept;
    ++samples_in_row[size_t(row)];
  }
  EXPECT_EQ(row + 1, p.size());
  EXPECT_EQ(p.dropped, dropped);
  for (int64_t i = 0; i < p.size() * seq_len; ++i) ASSERT_EQ(w[i], expect_w[size_t(i)]) << "target " << i;
  // Padding: everything after the last sample of a row is </s> with weight 0 (checked above).
  int64_t bos = 0;
  for (int64_t i = 0; i < p.tokens.numel(); ++i) bos += t[i] == tok.bos_id();
  EXPECT_EQ(bos, kept);
  if (!pack) {
    for (auto n : samples_in_row) EXPECT_EQ(n, 1);
  }
}

TEST(InstructPacking, KeepsSamplesWholeAndScoresResponsesOnly) {
  const auto& tok = small_tokenizer();
  const auto samples = packing_samples();
  const std::vector<std::string> domains = {"add", "rev"};
  const int64_t seq_len = 24;
  for (bool pack : {true, false}) {
    SCOPED_TRACE(pack ? "packed" : "one per row");
    const auto p = pack_samples(samples, tok, seq_len, domains, pack);
    check_packing(p, samples, tok, seq_len, pack);
    EXPECT_EQ(p.dropped, 1);
    // 12 samples of two tasks: packed, rows hold several; else one row each.
    if (pack) {
      EXPECT_LT(p.size(), 12);
    } else {
      EXPECT_EQ(p.size(), 12);
    }
  }
  // A window too short for most samples: those are left out, the rest kept whole.
  check_packing(pack_samples(samples, tok, 12, domains), samples, tok, 12, true);
  EXPECT_THROW(pack_samples(samples, tok, seq_len, {"rev"}), std::invalid_argument);

  // The batcher carries the weights with their rows.
  Batcher b(pack_samples(samples, tok, seq_len, domains), 2, 7, /*shuffle=*/true);
  for (int i = 0; i < 4; ++i) {
    auto batch = b.next();
    ASSERT_TRUE(batch.weight.defined());
    ASSERT_EQ(batch.weight.sizes(), torch::IntArrayRef({2, seq_len}));
    // Row by row, the weights are those of the packed row with the same tokens.
    const auto& data = b.data();
    for (int64_t r = 0; r < 2; ++r) {
      auto match = (data.tokens == batch.tokens[r]).all(1).nonzero();
      ASSERT_GE(match.size(0), 1);
      EXPECT_TRUE(torch::equal(data.weight[match[0][0].item<int64_t>()], batch.weight[r]));
    }
  }
  // Corpora packed from documents have no weights (weight 1 everywhere, as before).
  EXPECT_FALSE(
      pack_documents({{"x", "rev", "cat dog bird cat dog bird cat dog"}}, tok, 4, domains).weight.defined());
}

// ------------------------------------------------------------------------------------------ the loss

TransformerLM tiny_dense_model(int64_t vocab, int64_t seq_len) {
  ModelConfig m;
  m.vocab_size = vocab;
  m.d_model = 16;
  m.n_head = 2;
  m.n_layer = 1;
  m.d_ff = 24;
  m.moe_every = 0;  // dense: no routing, so finite differences see a smooth loss
  m.max_seq_len = seq_len;
  torch::manual_seed(3);
  TransformerLM model(m, MoEConfig{});
  model->to(torch::kDouble);
  return model;
}

Batcher::Batch masked_batch(int64_t B, int64_t S, int64_t vocab) {
  torch::manual_seed(5);
  Batcher::Batch b;
  b.tokens = torch::randint(vocab, {B, S + 1}, torch::kLong);
  b.domain = torch::zeros({B}, torch::kLong);
  // Row 0: prompt targets 0..3, response 4..6, padding 7; row 1: prompt 0..1, response 2..7.
  b.weight = torch::zeros({B, S});
  b.weight[0].narrow(0, 4, 3).fill_(1.0);
  b.weight[1].narrow(0, 2, S - 2).fill_(1.0);
  return b;
}

TEST(InstructLoss, WeightedLossIsTheMaskedMeanWithItsGradient) {
  const int64_t V = 40, B = 2, S = 8;
  auto model = tiny_dense_model(V, S);
  const auto batch = masked_batch(B, S, V);

  auto fwd = training_forward(model, batch);
  ASSERT_TRUE(fwd.weight.defined());
  auto loss = fwd.loss();
  // The explicit masked computation: the mean cross-entropy over the response targets only.
  auto logits = model->forward(batch.tokens.narrow(1, 0, S)).logits.reshape({B * S, V});
  auto keep = batch.weight.reshape(-1).nonzero().reshape(-1);
  auto explicit_loss = torch::nn::functional::cross_entropy(
      logits.index_select(0, keep), batch.tokens.narrow(1, 1, S).reshape(-1).index_select(0, keep));
  EXPECT_NEAR(loss.item<double>(), explicit_loss.item<double>(), 1e-12);
  EXPECT_EQ(keep.numel(), 9);

  std::vector<torch::Tensor> params;
  for (auto& p : model->parameters()) params.push_back(p);
  auto g = torch::autograd::grad({loss}, params);
  auto g_explicit = torch::autograd::grad({explicit_loss}, params);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TENSOR_NEAR(g[i], g_explicit[i], 1e-12, 1e-9);

  // Finite differences on the smallest parameter.
  auto smallest = params.front();
  for (auto& p : params)
    if (p.numel() < smallest.numel()) smallest = p;
  auto g_small = torch::autograd::grad({training_forward(model, batch).loss()}, {smallest})[0];
  auto numeric = test::numeric_grad([&] { return training_forward(model, batch).loss(); }, smallest);
  EXPECT_TENSOR_NEAR(g_small, numeric, 1e-7, 1e-5);

  // Without weights: exactly the plain mean, as before weights existed.
  auto unweighted = batch;
  unweighted.weight = torch::Tensor();
  auto plain = training_forward(model, unweighted);
  EXPECT_FALSE(plain.weight.defined());
  EXPECT_TRUE(torch::equal(plain.loss(), plain.token_ce.mean()));
}

TEST(InstructLoss, PromptAndPaddingTargetsDoNotCount) {
  const int64_t V = 40, B = 2, S = 8;
  auto model = tiny_dense_model(V, S);
  const auto batch = masked_batch(B, S, V);
  torch::NoGradGuard no_grad;
  const double base = training_forward(model, batch).loss().item<double>();
  // Row 0's last target (padding, weight 0) is the last token, an input to nothing: changing it leaves
  // the loss exactly as it was.
  auto changed = batch;
  changed.tokens = batch.tokens.clone();
  changed.tokens[0][S] = (changed.tokens[0][S].item<int64_t>() + 1) % V;
  EXPECT_EQ(training_forward(model, changed).loss().item<double>(), base);
  // Changing a response target changes it.
  changed.tokens = batch.tokens.clone();
  changed.tokens[1][S] = (changed.tokens[1][S].item<int64_t>() + 1) % V;
  EXPECT_NE(training_forward(model, changed).loss().item<double>(), base);
  // Zero weight on every target of row 1: the loss is row 0's responses alone.
  auto only0 = batch;
  only0.weight = batch.weight.clone();
  only0.weight[1].zero_();
  auto fwd = training_forward(model, only0);
  EXPECT_NEAR(fwd.loss().item<double>(), fwd.token_ce.narrow(0, 4, 3).mean().item<double>(), 1e-12);
}

// -------------------------------------------------------------------------------------- the trainer

// A tiny instruction-tuning run: the Brown corpus linked into a fresh data folder, every task, 64-token rows.
RunConfig tiny_instruct_config(const std::string& name, const std::vector<std::string>& extra) {
  const auto data_dir = tmp_dir(name + "_data");
  fs::create_directory_symlink(brown_data_dir() + "/brown", fs::path(data_dir) / "brown");
  std::vector<std::string> o = {
      "data.corpus=\"instruct\"", "data.dir=\"" + data_dir + "\"",   "data.vocab_size=512",
      "data.seq_len=64",          "data.instruct_train_per_task=20", "data.instruct_eval_per_task=4",
      "train.eval_batches=1"};
  o.insert(o.end(), extra.begin(), extra.end());
  return load_run_config_text("", "test", test::tiny_run_overrides(name, o));
}

TEST(InstructTraining, PrepareDataAndAFewSteps) {
  SKIP_WITHOUT_SOURCES();
  RunConfig cfg = tiny_instruct_config("instruct", {"train.steps=3"});
  std::ostringstream log;
  DataBundle d = prepare_data(cfg.data, nullptr, log);
  ASSERT_TRUE(d.instruct.has_value());
  ASSERT_TRUE(d.train.weight.defined());
  ASSERT_TRUE(d.heldout.weight.defined());
  EXPECT_EQ(d.train.domains.size(), cfg.data.instruct_tasks.size());
  // Most targets are prompt or padding; every row scores something.
  EXPECT_GT(d.train.weight.sum(1).min().item<double>(), 0.0);
  EXPECT_LT(d.train.weight.mean().item<double>(), 0.5);
  EXPECT_NE(log.str().find("instruct: 15 tasks (3 held out)"), std::string::npos) << log.str();

  TrainOptions o;
  o.out_dir = tmp_dir("train_run");
  o.progress = false;
  auto s = train_model(cfg, o, log);
  ASSERT_EQ(s.step_losses.size(), 3u);
  for (double l : s.step_losses) EXPECT_TRUE(std::isfinite(l));
  ASSERT_TRUE(s.validation && s.heldout);
  // Evaluation counts the response tokens only: of one batch (train.eval_batches = 1), the first
  // train.batch_size = 4 rows in order.
  EXPECT_EQ(s.validation->tokens, std::llround(d.validation.weight.narrow(0, 0, 4).sum().item<double>()));
  EXPECT_LT(s.validation->tokens, 4 * 64);

  // The task evaluation of the trained checkpoint: every task scored, the held-out ones marked, greedy
  // generations bounded, the routing tables filled from the response positions.
  auto lm = load_model(s.checkpoint);
  InstructEvalOptions eo;
  eo.per_task = 2;
  eo.max_new_tokens = 4;
  auto r = evaluate_instruct(lm.model, *lm.tokenizer, *d.instruct, d.instruct->test, eo);
  ASSERT_EQ(r.tasks.size(), 15u);
  int heldout = 0;
  for (const auto& t : r.tasks) {
    EXPECT_EQ(t.samples, 2) << t.task;
    EXPECT_GE(t.exact, 0);
    EXPECT_LE(t.exact, t.samples);
    // seq_len 64 is shorter than some tasks' samples (genre, pos_tag): those are counted, not scored.
    EXPECT_TRUE(t.tokens > 0 || t.too_long == t.samples) << t.task;
    EXPECT_TRUE(std::isfinite(t.loss())) << t.task;
    int64_t assigned = 0;
    for (auto n : t.expert) assigned += n;
    // top-2 of the tiny run's experts at every scored position of the first MoE layer
    EXPECT_EQ(assigned, 2 * t.tokens) << t.task;
    ASSERT_FALSE(t.examples.empty());
    heldout += t.heldout;
  }
  EXPECT_EQ(heldout, 3);
  EXPECT_NE(format_instruct_eval(r).find("held-out accuracy"), std::string::npos);
  EXPECT_NE(format_instruct_eval(r).find("multiple choice: held-in"), std::string::npos);
  EXPECT_TRUE(r.to_json().contains("tasks"));
  EXPECT_TRUE(r.to_json().contains("heldout_mc"));

  // Multiple choice: for every task, the count of samples whose reference wins equals the count found by
  // scoring each candidate alone (one row, its summed response log-likelihood) and taking the best.
  torch::NoGradGuard ng;
  lm.model->eval();
  const int64_t S = lm.model->model_config().max_seq_len;
  // One sample scored alone (one row): its summed response loss and response tokens; tokens 0 when it does
  // not fit the context.
  auto alone = [&](const InstructSample& x, const std::string& task) -> std::pair<double, double> {
    PackedData p = pack_samples({x}, *lm.tokenizer, S, {task}, /*pack=*/false);
    if (p.dropped > 0) return {0.0, 0.0};
    RouteContext ctx;
    ctx.prompt_len = p.prompt_len;
    auto out = lm.model->forward(p.tokens.narrow(1, 0, S), ctx);
    auto ce = torch::nn::functional::cross_entropy(
        out.logits.reshape({S, -1}), p.tokens.narrow(1, 1, S).reshape(-1),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    const auto w = p.weight.reshape(-1).to(torch::kDouble);
    return {(ce.to(torch::kDouble) * w).sum().item<double>(), w.sum().item<double>()};
  };
  int64_t scored_tasks = 0;
  for (const auto& t : r.tasks) {
    EXPECT_LE(t.mc_correct, t.mc_samples) << t.task;
    std::vector<InstructSample> mine;
    for (const auto& x : d.instruct->test)
      if (x.task == t.task && mine.size() < 2) mine.push_back(x);
    std::vector<std::string> pool;
    for (const auto& x : mine)
      if (std::find(pool.begin(), pool.end(), x.response) == pool.end()) pool.push_back(x.response);
    // Each sample's own response loss, as the per-sample list gives it (the same sample scored alone; 1e-4:
    // float32 products in a batch of rows against one row).
    ASSERT_EQ(t.sample_loss.size() + size_t(t.too_long), mine.size()) << t.task;
    for (const auto& [i, loss] : t.sample_loss) {
      ASSERT_LT(size_t(i), mine.size()) << t.task;
      const auto [sum, tokens] = alone(mine[size_t(i)], t.task);
      ASSERT_GT(tokens, 0) << t.task;
      EXPECT_NEAR(loss, sum / tokens, 1e-4 * sum / tokens) << t.task << " sample " << i;
    }
    int64_t samples = 0, correct = 0;
    for (size_t i = 0; i < mine.size(); ++i) {
      int64_t ref = 0;
      const auto cands = mc_candidates(mine[i], pool, eo.mc_choices, uint64_t(i) * 7919u + 1u, &ref);
      if (cands.size() < 2) continue;
      std::vector<double> ll;
      for (const auto& c : cands) {
        auto alt = mine[i];
        alt.response = c;
        const auto [sum, tokens] = alone(alt, t.task);
        if (tokens == 0) break;
        ll.push_back(-sum);
      }
      if (ll.size() != cands.size()) continue;  // a candidate longer than the context: not scored
      ++samples;
      correct += std::max_element(ll.begin(), ll.end()) - ll.begin() == ref;
    }
    EXPECT_EQ(t.mc_samples, samples) << t.task;
    EXPECT_EQ(t.mc_correct, correct) << t.task;
    if (samples > 0) {
      ++scored_tasks;
      EXPECT_NEAR(t.mc_chance(), 0.5, 1e-12) << t.task;  // two samples per task: one distractor each
    }
  }
  EXPECT_GT(scored_tasks, 0);
}

// The candidates of a multiple choice: the reference once, at the index it reports; distractors from the
// task's answers that match none of the accepted answers (after normalisation) and each other; at most
// `choices`; deterministic for a salt, and another salt starts elsewhere in the pool.
TEST(InstructEval, McCandidatesHoldTheReferenceAndDistinctDistractors) {
  InstructSample x;
  x.response = "Noun";
  x.answers = {"Noun", "a noun"};
  const std::vector<std::string> pool = {"noun.", "verb", "A Noun", "adjective", "Verb", "adverb", "pronoun"};
  for (uint64_t salt : {0u, 1u, 5u, 8u}) {
    int64_t ref = -1;
    const auto c = mc_candidates(x, pool, 4, salt, &ref);
    ASSERT_EQ(c.size(), 4u);
    ASSERT_GE(ref, 0);
    EXPECT_EQ(c[size_t(ref)], "Noun");
    std::vector<std::string> norms;
    for (size_t i = 0; i < c.size(); ++i) {
      if (int64_t(i) == ref) continue;
      const auto n = normalize_answer(c[i]);
      EXPECT_NE(n, "noun");
      EXPECT_NE(n, "a noun");
      EXPECT_EQ(std::count(norms.begin(), norms.end(), n), 0) << n;
      norms.push_back(n);
    }
    int64_t ref2 = -1;
    EXPECT_EQ(mc_candidates(x, pool, 4, salt, &ref2), c);
    EXPECT_EQ(ref2, ref);
  }
  int64_t r0 = 0, r1 = 0;
  EXPECT_NE(mc_candidates(x, pool, 3, 0, &r0), mc_candidates(x, pool, 3, 2, &r1));
  // Fewer distinct wrong answers than asked: all of them; none: the reference alone.
  int64_t r = 0;
  EXPECT_EQ(mc_candidates(x, {"verb", "noun"}, 4, 0, &r).size(), 2u);
  EXPECT_EQ(mc_candidates(x, {"noun", "A noun"}, 4, 3, &r), std::vector<std::string>{"Noun"});
  EXPECT_EQ(r, 0);
}

// MoCE in its own setting: the prompt pool with offline k-means on the prompts (TF-IDF: the hidden form needs
// an --init checkpoint, which scripts/instruct-experiment.sh runs), trained a
// few steps; the task evaluation reports clusters, and a sample's clusters depend on its prompt only.
TEST(InstructTraining, MoceWithThePromptPoolClustersPromptsOnly) {
  SKIP_WITHOUT_SOURCES();
  RunConfig cfg = tiny_instruct_config(
      "instruct_moce", {"data.instruct_pack=false", "moe.router=\"moce\"", "moe.n_cluster=2",
                        "moe.moce_pool=\"prompt\"", "moe.moce_clustering=\"tfidf\"", "train.steps=2"});
  std::ostringstream log;
  TrainOptions o;
  o.out_dir = tmp_dir("moce_run");
  o.progress = false;
  auto s = train_model(cfg, o, log);
  ASSERT_EQ(s.step_losses.size(), 2u) << log.str();
  auto lm = load_model(s.checkpoint);
  DataBundle d = prepare_data(lm.cfg.data, nullptr, log);
  ASSERT_TRUE(d.validation.prompt_len.defined());
  InstructEvalOptions eo;
  eo.per_task = 2;
  eo.max_new_tokens = 2;
  auto r = evaluate_instruct(lm.model, *lm.tokenizer, *d.instruct, d.instruct->test, eo);
  for (const auto& t : r.tasks) {
    if (t.tokens == 0) continue;  // samples longer than the tiny context
    ASSERT_EQ(t.cluster.size(), 2u) << t.task;
    EXPECT_EQ(t.cluster[0] + t.cluster[1], t.tokens) << t.task;
  }
  EXPECT_GE(r.cluster_purity_task, 0.0);
  EXPECT_LE(r.cluster_purity_task, 1.0);
  // Replace every response token of a batch with another token: the clusters do not move.
  torch::NoGradGuard ng;
  lm.model->eval();
  const int64_t B = 4, S = d.validation.seq_len();
  auto tokens = d.validation.tokens.narrow(0, 0, B).clone();
  auto plen = d.validation.prompt_len.narrow(0, 0, B);
  auto pos = torch::arange(S + 1).view({1, S + 1});
  auto changed = torch::where(pos >= plen.view({B, 1}), torch::full_like(tokens, 7), tokens);
  RouteContext ctx;
  ctx.prompt_len = plen;
  auto a = test::moce_token_clusters(lm.model->forward(tokens.narrow(1, 0, S), ctx).plans.at(0));
  auto b = test::moce_token_clusters(lm.model->forward(changed.narrow(1, 0, S), ctx).plans.at(0));
  EXPECT_TRUE(a.equal(b));
  // Without instruction rows of one sample the prompt pool is a config error naming the key.
  test::expect_config_error(
      [] {
        load_run_config_text("", "x", {"moe.router=\"moce\"", "moe.moce_pool=\"prompt\""});
      },
      "moe.moce_pool");
}

TEST(InstructEval, ExactMatchComparesNormalisedAnswers) {
  EXPECT_EQ(normalize_answer("  The  Cat.\n"), "the cat");
  EXPECT_EQ(normalize_answer("seventy-two!"), "seventy-two");
  EXPECT_EQ(normalize_answer(": noun"), "noun");
  EXPECT_EQ(normalize_answer(""), "");
  EXPECT_TRUE(answer_matches("Cat", {"cat"}));
  EXPECT_TRUE(answer_matches(" apple  banana cherry ", {"apple banana cherry"}));
  EXPECT_TRUE(answer_matches("big", {"large", "big"}));  // any accepted answer
  EXPECT_FALSE(answer_matches("cats", {"cat"}));
  EXPECT_FALSE(answer_matches("cherry banana apple", {"apple banana cherry"}));  // order matters
  EXPECT_FALSE(answer_matches("", {"cat"}));
  EXPECT_FALSE(answer_matches("cat", {}));
}

}  // namespace
}  // namespace moeforge
