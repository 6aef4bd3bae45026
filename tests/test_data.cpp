// The data pipeline: [data] config, Brown and text-folder corpora, the split, packing, batching, TF-IDF.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include "moeforge/config/binder.h"
#include "moeforge/data/data.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

using ::moeforge::test::expect_config_error;

std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

std::string tmp_dir(const std::string& name) {
  const auto dir =
      fs::path(::testing::TempDir()) / ("moeforge_data_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void write(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

// The Brown corpus as installed by scripts/install-deps.sh (a git-ignored folder).
std::string brown_data_dir() {
  return std::string(MOEFORGE_SOURCE_DIR) + "/data";
}
bool have_brown() {
  return fs::is_directory(brown_data_dir() + "/brown");
}

// `n_per_domain` documents in each of `domains`, with distinct ids.
std::vector<Document> synthetic_docs(const std::vector<std::string>& domains, int n_per_domain) {
  std::vector<Document> docs;
  for (const auto& d : domains)
    for (int i = 0; i < n_per_domain; ++i) docs.push_back({d + "/" + std::to_string(i), d, "text of " + d});
  return docs;
}

TEST(DataConfig, DefaultsAreValid) {
  EXPECT_NO_THROW(DataConfig{}.validate());
}

TEST(DataConfig, BadValuesNameTheirField) {
  auto with = [](auto change) {
    DataConfig c;
    change(c);
    return [c] { c.validate(); };
  };
  expect_config_error(with([](DataConfig& c) { c.corpus = "wiki"; }), "data.corpus");
  expect_config_error(with([](DataConfig& c) { c.corpus = "text:"; }), "data.corpus");
  expect_config_error(with([](DataConfig& c) { c.dir = ""; }), "data.dir");
  expect_config_error(with([](DataConfig& c) { c.validation_fraction = 1.0; }), "data.validation_fraction");
  expect_config_error(with([](DataConfig& c) { c.validation_fraction = -0.1; }), "data.validation_fraction");
  expect_config_error(with([](DataConfig& c) { c.vocab_size = 10; }), "data.vocab_size");
  expect_config_error(with([](DataConfig& c) { c.seq_len = 0; }), "data.seq_len");
  expect_config_error(with([](DataConfig& c) { c.seed = -1; }), "data.seed");
  expect_config_error(with([](DataConfig& c) {
                        c.heldout_genres = {"humor", "poetry"};
                      }),
                      "data.heldout_genres");
  expect_config_error(with([](DataConfig& c) { c.heldout_genres = {"i"}; }), "data.heldout_genres");  // no i
  // Names and letters are both accepted.
  DataConfig ok;
  ok.heldout_genres = {"humor", "k", "science_fiction"};
  EXPECT_NO_THROW(ok.validate());
}

TEST(DataConfig, TomlArraysAndOverrides) {
  DataConfig c;
  ConfigBinder b;
  bind_data_config(b, &c);
  b.apply_text("[data]\nheldout_genres = [\"humor\", \"m\"]\nseq_len = 64\nvalidation_fraction = 0.1\n",
               "test.toml");
  EXPECT_EQ(c.heldout_genres, (std::vector<std::string>{"humor", "m"}));
  EXPECT_EQ(c.seq_len, 64);
  EXPECT_DOUBLE_EQ(c.validation_fraction, 0.1);
  b.apply_override("data.heldout_genres=romance");  // a bare word is a list of one
  EXPECT_EQ(c.heldout_genres, (std::vector<std::string>{"romance"}));
  b.apply_override("data.heldout_genres=[]");
  EXPECT_TRUE(c.heldout_genres.empty());
  expect_config_error([&] { b.apply_text("[data]\nheldout_genres = [\"a\", 3]\n", "t.toml"); },
                      "data.heldout_genres");
  expect_config_error([&] { b.apply_text("[data]\nheldout_genres = 3\n", "t.toml"); }, "data.heldout_genres");
  expect_config_error([&] { b.apply_text("[data]\nvocab = 3\n", "t.toml"); }, "data.vocab");
}

TEST(Corpus, BrownLoadsAllDocumentsWithTagsStripped) {
  if (!have_brown()) GTEST_SKIP() << brown_data_dir() << "/brown is missing: run scripts/install-deps.sh";
  DataConfig cfg;
  cfg.dir = brown_data_dir();
  const auto docs = load_corpus(cfg);
  ASSERT_EQ(docs.size(), 500u);
  std::set<std::string> domains;
  size_t words = 0;
  for (const auto& d : docs) {
    domains.insert(d.domain);
    words += std::count(d.text.begin(), d.text.end(), ' ') + 1;
  }
  EXPECT_EQ(domains.size(), 15u);
  EXPECT_GT(words, 900000u);  // ~1.16M tokens, of which some punctuation was glued to its word
  EXPECT_EQ(docs[0].id, "ca01");
  EXPECT_EQ(docs[0].domain, "press_reportage");
  const std::string first =
      "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election "
      "produced \"no evidence\" that any irregularities took place.";
  EXPECT_EQ(docs[0].text.substr(0, first.size()), first);
  EXPECT_EQ(docs[0].text.substr(first.size(), 10), " The jury ");
  for (const auto& d : docs) {
    // Tags look like "/nn", "/at", "/vbd-hl"; quotes were converted.
    ASSERT_EQ(d.text.find("/at "), std::string::npos) << d.id;
    ASSERT_EQ(d.text.find("``"), std::string::npos) << d.id;
    ASSERT_EQ(d.text.find(" ,"), std::string::npos) << d.id;
  }
  EXPECT_EQ(docs.back().id, "cr09");
  EXPECT_EQ(docs.back().domain, "humor");
}

// A corpus line of any length is cut before the tokenizer (docs/reliability.md, "Shared folders and
// limits"): at the last space before the limit, or at a UTF-8 character boundary; shorter lines are kept
// exactly, so ordinary text is untouched.
TEST(Corpus, LongLinesAreCutAndShortOnesKept) {
  const std::string text = "short line\nanother one\n";
  EXPECT_EQ(cut_long_lines(text, 16), text);
  auto cut = cut_long_lines("aaaa bbbb cccc dddd eeee\nok\n", 10);
  EXPECT_EQ(cut, "aaaa bbbb\ncccc dddd\neeee\nok\n");
  // No space: cut at the limit, never inside a character (each "é" is two bytes).
  std::string accents;
  for (int i = 0; i < 20; ++i) accents += "\xc3\xa9";
  for (const auto& line : split_lines(cut_long_lines(accents, 9))) {
    EXPECT_LE(line.size(), 9u);
    EXPECT_EQ(non_text_bytes(line).bytes, 0u) << "a character was split";
  }
  std::string huge(3 * kMaxLineBytes + 5, 'x');
  for (const auto& line : split_lines(cut_long_lines(huge))) EXPECT_LE(line.size(), kMaxLineBytes);
}

TEST(Corpus, NonTextBytesAreFound) {
  EXPECT_EQ(non_text_bytes("plain words, caf\xc3\xa9").first, std::string::npos);
  EXPECT_EQ(non_text_bytes(std::string("ab\0c", 4)).first, 2u);
  const auto png = non_text_bytes("ab\x89PNG");  // a continuation byte with no lead
  EXPECT_EQ(png.first, 2u);
  EXPECT_EQ(png.bytes, 1u);
  EXPECT_EQ(non_text_bytes("ab\xc3").first, 2u);  // truncated
}

TEST(Corpus, DetokenizerSpacing) {
  EXPECT_EQ(brown_detokenize("He/pps said/vbd ,/, ``/`` Go/vb (/( now/rb )/) !/. ''/'' ", "t"),
            "He said, \"Go (now)!\"");
  EXPECT_EQ(brown_detokenize("1/cd //in 2/cd", "t"), "1 / 2");  // the tag follows the last slash
  try {
    brown_detokenize("fine/jj\nuntagged", "some/file");
    ADD_FAILURE() << "no error for an untagged token";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), "some/file");
    EXPECT_NE(std::string(e.what()).find("line 2"), std::string::npos) << e.what();
  }
}

TEST(Corpus, MissingFolderNamesThePath) {
  DataConfig cfg;
  cfg.dir = tmp_dir("missing") + "/nowhere";
  try {
    load_corpus(cfg);
    ADD_FAILURE() << "no error for a missing corpus";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), cfg.dir + "/brown");
    EXPECT_NE(std::string(e.what()).find("install-deps.sh"), std::string::npos) << e.what();
  }
  cfg.corpus = "text:" + cfg.dir;
  try {
    load_corpus(cfg);
    ADD_FAILURE() << "no error for a missing text folder";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), cfg.dir);
  }
  // A folder that exists but holds no Brown files is an error too.
  cfg.corpus = "brown";
  cfg.dir = tmp_dir("empty");
  fs::create_directories(cfg.dir + "/brown");
  EXPECT_THROW(load_corpus(cfg), FileError);
}

TEST(Corpus, TextFolderUsesSubFoldersAsDomains) {
  const auto root = tmp_dir("text");
  write(fs::path(root) / "news" / "a.txt", "Stocks fell today.");
  write(fs::path(root) / "news" / "deep" / "b.txt", "Rain is expected.");
  write(fs::path(root) / "poems" / "c.txt", "Roses are red.");
  write(fs::path(root) / "flat.txt", "A flat file.");
  write(fs::path(root) / "notes.md", "not a .txt file");
  DataConfig cfg;
  cfg.corpus = "text:" + root;
  const auto docs = load_corpus(cfg);
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[0].id, "flat.txt");
  EXPECT_EQ(docs[0].domain, "text");
  EXPECT_EQ(docs[1].id, "news/a.txt");
  EXPECT_EQ(docs[1].domain, "news");
  EXPECT_EQ(docs[1].text, "Stocks fell today.");
  EXPECT_EQ(docs[2].id, "news/deep/b.txt");
  EXPECT_EQ(docs[2].domain, "news");
  EXPECT_EQ(docs[3].domain, "poems");
  const auto split = split_corpus(docs, cfg);
  EXPECT_EQ(split.domains, (std::vector<std::string>{"news", "poems", "text"}));
  // Held-out names are checked against this corpus's folders.
  cfg.heldout_genres = {"humor"};
  expect_config_error([&] { split_corpus(docs, cfg); }, "data.heldout_genres");
  cfg.heldout_genres = {"poems"};
  EXPECT_EQ(split_corpus(docs, cfg).heldout.size(), 1u);
}

TEST(Split, DeterministicAndHeldOutGenresStayOut) {
  auto docs = synthetic_docs({"adventure", "humor", "mystery", "romance"}, 40);
  DataConfig cfg;
  cfg.heldout_genres = {"r"};  // a Brown letter, for humor
  cfg.validation_fraction = 0.1;
  const auto split = split_corpus(docs, cfg);
  EXPECT_EQ(split.domains, (std::vector<std::string>{"adventure", "humor", "mystery", "romance"}));
  EXPECT_EQ(split.heldout.size(), 40u);
  EXPECT_EQ(split.validation.size(), 12u);  // 10% of 40, in each of the 3 training genres
  EXPECT_EQ(split.train.size(), 108u);
  for (const auto& d : split.heldout) EXPECT_EQ(d.domain, "humor");
  for (const auto* part : {&split.train, &split.validation})
    for (const auto& d : *part) EXPECT_NE(d.domain, "humor") << d.id;
  std::set<std::string> seen;
  for (const auto* part : {&split.train, &split.validation, &split.heldout})
    for (const auto& d : *part) EXPECT_TRUE(seen.insert(d.id).second) << d.id << " is in two parts";
  EXPECT_EQ(seen.size(), docs.size());

  // The input order does not matter; the seed does.
  std::mt19937 rng(5);
  std::shuffle(docs.begin(), docs.end(), rng);
  auto ids = [](const std::vector<Document>& v) {
    std::vector<std::string> out;
    for (const auto& d : v) out.push_back(d.id);
    return out;
  };
  const auto again = split_corpus(docs, cfg);
  EXPECT_EQ(ids(again.validation), ids(split.validation));
  EXPECT_EQ(ids(again.train), ids(split.train));
  cfg.seed = 99;
  EXPECT_NE(ids(split_corpus(docs, cfg).validation), ids(split.validation));

  cfg.heldout_genres = {"poetry"};
  expect_config_error([&] { split_corpus(docs, cfg); }, "data.heldout_genres");
  cfg.heldout_genres = {"adventure", "humor", "mystery", "romance"};
  expect_config_error([&] { split_corpus(docs, cfg); }, "data.heldout_genres");
}

TEST(Split, SmallDomainsKeepATrainingDocument) {
  DataConfig cfg;
  cfg.validation_fraction = 0.05;
  const auto split = split_corpus(synthetic_docs({"one", "two"}, 1), cfg);
  EXPECT_EQ(split.train.size(), 2u);
  EXPECT_TRUE(split.validation.empty());
  const auto split3 = split_corpus(synthetic_docs({"three"}, 3), cfg);
  EXPECT_EQ(split3.validation.size(), 1u);  // 5% of 3 rounds to 0, but a domain with >= 2 gets one
}

// A tokenizer over a tiny vocabulary, trained in well under a second.
const Tokenizer& small_tokenizer() {
  static const Tokenizer tok = [] {
    std::vector<std::string> texts;
    for (int i = 0; i < 30; ++i)
      texts.push_back("the cat sat on the mat and the dog ran in the park while birds sang " +
                      std::to_string(i));
    return Tokenizer::train(texts, 100, 1);
  }();
  return tok;
}

TEST(Packing, KeepsLabelsAndShapes) {
  const auto& tok = small_tokenizer();
  std::vector<Document> docs = {{"x1", "cats", "the cat sat on the mat and the cat sat on the mat"},
                                {"x2", "dogs", "the dog ran in the park"},
                                {"x3", "cats", "a"}};
  const std::vector<std::string> domains = {"birds", "cats", "dogs"};
  const int64_t seq_len = 4;
  const auto packed = pack_documents(docs, tok, seq_len, domains);
  // Expected rows: windows of each document's <s> ids </s>, overlapping by one token; short tails dropped.
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> labels;
  for (const auto& d : docs) {
    auto ids = tok.encode(d.text);
    ids.insert(ids.begin(), tok.bos_id());
    ids.push_back(tok.eos_id());
    for (size_t j = 0; (j + 1) * seq_len + 1 <= ids.size(); ++j) {
      rows.emplace_back(ids.begin() + j * seq_len, ids.begin() + (j + 1) * seq_len + 1);
      labels.push_back(domain_id(domains, d.domain));
    }
  }
  ASSERT_GT(rows.size(), 2u);
  ASSERT_EQ(packed.tokens.sizes(), torch::IntArrayRef({static_cast<int64_t>(rows.size()), seq_len + 1}));
  ASSERT_EQ(packed.domain.sizes(), torch::IntArrayRef({static_cast<int64_t>(rows.size())}));
  EXPECT_EQ(packed.tokens.scalar_type(), torch::kLong);
  EXPECT_EQ(packed.domains, domains);
  for (size_t r = 0; r < rows.size(); ++r) {
    EXPECT_EQ(packed.domain[r].item<int64_t>(), labels[r]) << "row " << r;
    for (int64_t s = 0; s <= seq_len; ++s) EXPECT_EQ(packed.tokens[r][s].item<int64_t>(), rows[r][s]);
  }
  EXPECT_EQ(packed.tokens[0][0].item<int64_t>(), tok.bos_id());
  EXPECT_EQ(packed.domain[0].item<int64_t>(), 1);  // "cats"
  EXPECT_THROW(pack_documents({{"y", "fish", "the cat"}}, tok, seq_len, domains), std::invalid_argument);
}

PackedData numbered_sequences(int64_t n) {
  PackedData d;
  d.tokens = torch::arange(n, torch::kLong).unsqueeze(1).repeat({1, 3});  // [n, 3]: row i holds i
  d.domain = torch::arange(n, torch::kLong) % 2;                          // [n]
  d.domains = {"even", "odd"};
  return d;
}

TEST(Batcher, ShuffledEpochsVisitEverySequenceOnce) {
  Batcher b(numbered_sequences(10), 3, 42, /*shuffle=*/true);
  EXPECT_EQ(b.batches_per_epoch(), 3);  // the last partial batch of 1 is dropped
  std::set<int64_t> seen;
  for (int i = 0; i < 3; ++i) {
    const auto batch = b.next();
    ASSERT_EQ(batch.tokens.sizes(), torch::IntArrayRef({3, 3}));
    ASSERT_EQ(batch.domain.sizes(), torch::IntArrayRef({3}));
    for (int r = 0; r < 3; ++r) {
      const int64_t id = batch.tokens[r][0].item<int64_t>();
      EXPECT_TRUE(seen.insert(id).second) << id << " twice in one epoch";
      EXPECT_EQ(batch.domain[r].item<int64_t>(), id % 2) << "labels travel with their rows";
    }
  }
  EXPECT_EQ(b.epoch(), 0);
  b.next();
  EXPECT_EQ(b.epoch(), 1);
  EXPECT_EQ(b.position(), 3);
}

TEST(Batcher, RestoreContinuesIdentically) {
  Batcher original(numbered_sequences(10), 3, 7, /*shuffle=*/true);
  for (int i = 0; i < 5; ++i) original.next();  // into the second epoch
  Batcher resumed(numbered_sequences(10), 3, 7, /*shuffle=*/true);
  resumed.restore(original.epoch(), original.position());
  for (int i = 0; i < 10; ++i) {  // across two more epoch boundaries
    const auto a = original.next();
    const auto b = resumed.next();
    ASSERT_TRUE(torch::equal(a.tokens, b.tokens)) << "batch " << i;
    ASSERT_TRUE(torch::equal(a.domain, b.domain)) << "batch " << i;
  }
  EXPECT_THROW(resumed.restore(0, 11), std::out_of_range);
  // Epochs are shuffled differently.
  Batcher fresh(numbered_sequences(10), 10, 7, /*shuffle=*/true);
  EXPECT_FALSE(torch::equal(fresh.next().tokens, fresh.next().tokens));
}

TEST(Batcher, UnshuffledVisitsInOrderWithAPartialLastBatch) {
  Batcher b(numbered_sequences(5), 2, 0, /*shuffle=*/false);
  EXPECT_EQ(b.batches_per_epoch(), 3);
  EXPECT_TRUE(torch::equal(b.next().tokens.select(1, 0), torch::tensor({0, 1}, torch::kLong)));
  b.next();
  const auto last = b.next();
  EXPECT_TRUE(torch::equal(last.tokens.select(1, 0), torch::tensor({4}, torch::kLong)));
  EXPECT_TRUE(torch::equal(b.next().tokens.select(1, 0), torch::tensor({0, 1}, torch::kLong)));
  EXPECT_EQ(b.epoch(), 1);
  EXPECT_THROW(Batcher(numbered_sequences(2), 3, 0, /*shuffle=*/true), std::invalid_argument);
}

TEST(TfIdf, UnitRowsAndSameDomainCloser) {
  // Two domains over a 100-id vocabulary: each draws mostly from its own 40 ids, sometimes from 20 shared.
  std::mt19937_64 rng(3);
  std::vector<std::vector<int64_t>> seqs;
  std::vector<int> domain;
  for (int i = 0; i < 20; ++i) {
    const int dom = i % 2;
    std::vector<int64_t> s;
    for (int t = 0; t < 60; ++t)
      s.push_back(rng() % 3 == 0 ? 80 + static_cast<int64_t>(rng() % 20)
                                 : dom * 40 + static_cast<int64_t>(rng() % 40));
    seqs.push_back(s);
    domain.push_back(dom);
  }
  seqs.push_back({});  // an empty sequence gives a zero row
  const auto emb = tfidf_embeddings(seqs, 100);
  ASSERT_EQ(emb.sizes(), torch::IntArrayRef({21, 100}));
  // float32 sums of 100 terms: 1e-5 is ~100 ulps of 1.0, far above rounding and far below any real error.
  EXPECT_TENSOR_NEAR(emb.slice(0, 0, 20).norm(2, 1), torch::ones({20}), 1e-5, 0);
  EXPECT_EQ(emb[20].abs().sum().item<float>(), 0.0f);
  const auto cos = torch::matmul(emb.slice(0, 0, 20), emb.slice(0, 0, 20).t());  // [20, 20]
  double same = 0, other = 0;
  int n_same = 0, n_other = 0;
  for (int i = 0; i < 20; ++i)
    for (int j = 0; j < 20; ++j) {
      if (i == j) continue;
      (domain[i] == domain[j] ? same : other) += cos[i][j].item<double>();
      (domain[i] == domain[j] ? n_same : n_other) += 1;
    }
  EXPECT_GT(same / n_same, other / n_other + 0.1);  // a clear margin, not a rounding accident
  EXPECT_THROW(tfidf_embeddings({{100}}, 100), std::out_of_range);
}

// The whole Brown pipeline at the default sizes, with timings: run by hand with
// --gtest_also_run_disabled_tests (docs/data.md quotes the numbers). Too slow for every test run.
TEST(Brown, DISABLED_FullPipelineTimings) {
  if (!have_brown()) GTEST_SKIP() << "no Brown corpus";
  using clock = std::chrono::steady_clock;
  auto secs = [](clock::time_point a) { return std::chrono::duration<double>(clock::now() - a).count(); };
  DataConfig cfg;
  cfg.dir = brown_data_dir();
  cfg.heldout_genres = {"humor"};
  auto t0 = clock::now();
  auto docs = load_corpus(cfg);
  std::printf("load_corpus: %zu documents in %.2f s\n", docs.size(), secs(t0));
  t0 = clock::now();
  const auto split = split_corpus(docs, cfg);
  std::printf("split: train %zu, validation %zu, held-out %zu in %.3f s\n", split.train.size(),
              split.validation.size(), split.heldout.size(), secs(t0));
  std::vector<std::string> texts;
  for (const auto& d : split.train) texts.push_back(d.text);
  t0 = clock::now();
  const auto tok = Tokenizer::train(texts, cfg.vocab_size, cfg.seed);
  std::printf("tokenizer training (vocab %lld): %.2f s\n", static_cast<long long>(cfg.vocab_size), secs(t0));
  t0 = clock::now();
  const auto packed = pack_documents(split.train, tok, cfg.seq_len, split.domains);
  std::printf("pack_documents: %lld sequences of %lld in %.2f s\n", static_cast<long long>(packed.size()),
              static_cast<long long>(cfg.seq_len), secs(t0));
  EXPECT_GT(packed.size(), 0);
}

}  // namespace
}  // namespace moeforge
