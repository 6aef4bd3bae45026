// SentencePiece tokenizer: round trips, serialization, errors, deterministic training and the cache.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "moeforge/data/corpus.h"
#include "moeforge/data/tokenizer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

// Seeded sentences over a small English vocabulary: enough distinct words for a few hundred BPE merges,
// small enough that training takes well under a second.
std::vector<std::string> synthetic_texts(int n_texts, uint64_t seed) {
  static const std::vector<std::string> kWords = {
      "the",         "quick",     "brown",      "fox",     "jumps",     "over",         "lazy",
      "dog",         "a",         "jury",       "said",    "friday",    "county",       "election",
      "produced",    "no",        "evidence",   "that",    "any",       "took",         "place",
      "city",        "committee", "which",      "had",     "charge",    "of",           "manner",
      "in",          "was",       "conducted",  "reports", "possible",  "primary",      "won",
      "mayor",       "relative",  "handful",    "such",    "received",  "considering",  "widespread",
      "interest",    "number",    "voters",     "size",    "this",      "registration", "laws",
      "are",         "outmoded",  "inadequate", "often",   "ambiguous", "it",           "recommended",
      "legislators", "act",       "have",       "these",   "studied",   "revised",      "end",
      "modernizing", "improving", "them",       "grand",   "praise",    "thanks",       "atlanta"};
  std::mt19937_64 rng(seed);
  std::vector<std::string> texts;
  for (int t = 0; t < n_texts; ++t) {
    std::string text;
    for (int s = 0; s < 20; ++s) {
      const int len = 5 + static_cast<int>(rng() % 10);
      for (int w = 0; w < len; ++w) {
        std::string word = kWords[rng() % kWords.size()];
        if (w == 0) word[0] = static_cast<char>(std::toupper(word[0]));
        text += (text.empty() ? "" : " ") + word;
      }
      text += ".";
    }
    texts.push_back(text);
  }
  return texts;
}

std::string tmp_dir(const std::string& name) {
  const auto dir = std::filesystem::path(::testing::TempDir()) /
                   ("moeforge_tok_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

const char* kSample = "The jury said Friday that the Atlanta election produced no evidence.";

TEST(Tokenizer, EncodeDecodeRoundTrip) {
  const auto tok = Tokenizer::train(synthetic_texts(40, 1), 256, 7);
  EXPECT_EQ(tok.vocab_size(), 256);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  const auto ids = tok.encode(kSample);
  ASSERT_FALSE(ids.empty());
  for (int64_t id : ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, tok.vocab_size());
    EXPECT_NE(id, 0) << "no <unk>: every character of the sample was seen in training";
  }
  // BPE merged common words: fewer ids than characters.
  EXPECT_LT(ids.size(), std::string(kSample).size() / 2);
  EXPECT_EQ(tok.decode(ids), kSample);
  EXPECT_THROW(tok.decode({tok.vocab_size()}), std::out_of_range);
}

TEST(Tokenizer, SerializedModelGivesIdenticalIds) {
  const auto tok = Tokenizer::train(synthetic_texts(40, 1), 256, 7);
  const auto copy = Tokenizer::from_serialized(tok.serialized());
  EXPECT_EQ(copy.encode(kSample), tok.encode(kSample));
  EXPECT_EQ(copy.serialized(), tok.serialized());

  const auto path = tmp_dir("save") + "/tok.model";
  tok.save(path);
  const auto loaded = Tokenizer::load(path);
  EXPECT_EQ(loaded.encode(kSample), tok.encode(kSample));
  EXPECT_EQ(loaded.vocab_size(), tok.vocab_size());
}

TEST(Tokenizer, TrainingIsDeterministic) {
  const auto texts = synthetic_texts(40, 2);
  EXPECT_EQ(Tokenizer::train(texts, 256, 3).serialized(), Tokenizer::train(texts, 256, 3).serialized());
}

TEST(Tokenizer, GarbageAndMissingFilesAreErrors) {
  EXPECT_THROW(Tokenizer::from_serialized("this is not a model"), std::invalid_argument);
  EXPECT_THROW(Tokenizer::from_serialized(""), std::invalid_argument);
  const auto dir = tmp_dir("garbage");
  try {
    Tokenizer::load(dir + "/missing.model");
    ADD_FAILURE() << "no error for a missing model";
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), dir + "/missing.model");
  }
  { std::ofstream(dir + "/bad.model") << "garbage bytes"; }
  EXPECT_THROW(Tokenizer::load(dir + "/bad.model"), FileError);
}

TEST(Tokenizer, CacheReusesTheModelForTheSameSplit) {
  CorpusSplit split;
  const auto texts = synthetic_texts(20, 4);
  for (size_t i = 0; i < texts.size(); ++i)
    split.train.push_back({"d" + std::to_string(i), "text", texts[i]});
  split.domains = {"text"};
  DataConfig cfg;
  cfg.corpus = "text:/nowhere";
  cfg.vocab_size = 200;
  const auto cache = tmp_dir("cache");
  auto n_files = [&] {
    return std::distance(std::filesystem::directory_iterator(cache), std::filesystem::directory_iterator());
  };
  const auto first = train_or_load_tokenizer(split, cfg, cache);
  ASSERT_EQ(n_files(), 1);
  const auto second = train_or_load_tokenizer(split, cfg, cache);
  EXPECT_EQ(second.serialized(), first.serialized());
  EXPECT_EQ(n_files(), 1) << "the second call re-used the cached model";

  // A damaged cache entry is retrained over, not an error.
  for (const auto& f : std::filesystem::directory_iterator(cache)) std::ofstream(f.path()) << "damaged";
  EXPECT_EQ(train_or_load_tokenizer(split, cfg, cache).serialized(), first.serialized());

  // Another vocabulary size or training set is another key.
  cfg.vocab_size = 220;
  EXPECT_EQ(train_or_load_tokenizer(split, cfg, cache).vocab_size(), 220);
  EXPECT_EQ(n_files(), 2);
  split.train.pop_back();
  train_or_load_tokenizer(split, cfg, cache);
  EXPECT_EQ(n_files(), 3);
}

// Fuzz finding (docs/reliability.md): a model whose normaliser table (precompiled_charsmap) has trie offsets
// outside the table made SentencePiece read out of bounds in encode. The shim now refuses such a model.
TEST(Tokenizer, ModelWithAnOutOfBoundsNormaliserTableIsRefused) {
  const std::string path =
      std::string(MOEFORGE_SOURCE_DIR) + "/fuzz/regressions/tokenizer/normalizer-table-out-of-bounds";
  try {
    Tokenizer::load(path);
    ADD_FAILURE() << "the hostile model loaded";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("precompiled_charsmap"), std::string::npos) << e.what();
  }
  // The real model it was mutated from still loads.
  EXPECT_GT(
      Tokenizer::load(std::string(MOEFORGE_SOURCE_DIR) + "/fuzz/corpus/tokenizer/tiny.model").vocab_size(),
      0);
}

}  // namespace
}  // namespace moeforge
