// Tokenized shards (docs/data.md, "Your own corpus"): `moeforge tokenize`'s folder batches exactly as the
// in-memory corpus does, resumes exactly, slices per rank, and every bad input is a named error.
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "moeforge/data/jsonl.h"
#include "moeforge/data/prepare.h"
#include "moeforge/data/random.h"
#include "moeforge/data/shards.h"
#include "moeforge/data/tokenize.h"
#include "moeforge/train/parallel.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

std::string tmp_dir(const std::string& name) {
  const auto dir =
      fs::path(::testing::TempDir()) / ("moeforge_shards_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::string brown_data_dir() {
  return std::string(MOEFORGE_SOURCE_DIR) + "/data";
}
bool have_brown() {
  return fs::is_directory(brown_data_dir() + "/brown");
}

// A JSON-lines corpus of `n` short documents over three domains, learnable enough to train a tokenizer.
std::string jsonl_lines(int n) {
  const char* words[] = {"river", "stone", "market", "letter", "garden", "window", "engine", "summer"};
  std::ostringstream out;
  for (int i = 0; i < n; ++i) {
    nlohmann::json j;
    std::string text = "the " + std::string(words[i % 8]) + " and the " + words[(i * 3 + 1) % 8] +
                       " were seen " + std::to_string(i % 13) + " times by the " + words[(i * 5 + 2) % 8] +
                       ".";
    j["text"] = text;
    j["domain"] = "d" + std::to_string(i % 3);
    out << j.dump() << "\n";
  }
  return out.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

DataConfig jsonl_config(const std::string& path, std::vector<std::string> heldout = {}) {
  DataConfig c;
  c.corpus = "jsonl:" + path;
  c.vocab_size = 128;
  c.seq_len = 16;
  c.heldout_genres = std::move(heldout);
  c.validation_fraction = 0.1;
  return c;
}

nlohmann::json tokenize(const DataConfig& c, const std::string& out, const std::string& tokenizer = "") {
  TokenizeOptions o;
  o.data = c;
  o.out_dir = out;
  o.tokenizer = tokenizer;
  o.progress = false;
  std::ostringstream log;
  return tokenize_corpus(o, log);
}

// Expects `fn` to throw FileError whose message holds every one of `parts`.
template <class Fn>
void expect_file_error(Fn fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one naming " << parts.front();
  } catch (const FileError& e) {
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

void expect_same_rows(const PackedRows& a, const PackedRows& b, const std::string& where) {
  ASSERT_TRUE(a.tokens.equal(b.tokens)) << where;
  ASSERT_TRUE(a.domain.equal(b.domain)) << where;
  ASSERT_TRUE(a.doc.defined() && b.doc.defined()) << where;
  ASSERT_TRUE(a.doc.equal(b.doc)) << where;
}

// The first check: Brown's shards give the in-memory batcher's batches, step by step, for the same
// seed, across epochs, and the evaluation orders (sequential and interleaved) agree too.
TEST(ShardsBrown, BatchesEqualTheInMemoryBatcherStepByStep) {
  if (!have_brown()) GTEST_SKIP() << "Brown corpus not installed (scripts/install-deps.sh)";
  DataConfig c;
  c.dir = brown_data_dir();
  c.heldout_genres = {"humor"};
  const std::string out = tmp_dir("brown") + "/shards";
  const auto m = tokenize(c, out);
  EXPECT_EQ(m["id_bytes"], 2);  // 2048 pieces fit in uint16
  std::ostringstream log;
  const DataBundle mem = prepare_data(c, nullptr, log);
  DataConfig cs = c;
  cs.corpus = "shards:" + out;
  const DataBundle sh = prepare_data(cs, nullptr, log);
  ASSERT_TRUE(sh.train.shards && !mem.train.shards);
  EXPECT_EQ(sh.train.domains, mem.train.domains);
  EXPECT_EQ(sh.tokenizer->serialized(), mem.tokenizer->serialized());
  for (const auto& [a, b, name] : {std::tuple{&mem.train, &sh.train, "train"},
                                   {&mem.validation, &sh.validation, "validation"},
                                   {&mem.heldout, &sh.heldout, "heldout"}}) {
    ASSERT_EQ(a->size(), b->size()) << name;
    ASSERT_EQ(a->seq_len(), b->seq_len()) << name;
    EXPECT_TRUE(a->all_domains().equal(b->all_domains())) << name;
  }
  // Shuffled training batches over two and a half epochs: B = 512 gives ~20 batches an epoch.
  Batcher bm(mem.train, 512, 77, true), bs(sh.train, 512, 77, true);
  const int64_t steps = bm.batches_per_epoch() * 5 / 2;
  for (int64_t i = 0; i < steps; ++i) {
    expect_same_rows(bm.next(), bs.next(), "training step " + std::to_string(i));
    ASSERT_EQ(bm.epoch(), bs.epoch());
    ASSERT_EQ(bm.position(), bs.position());
  }
  // Evaluation orders.
  for (auto order : {Batcher::Order::kSequential, Batcher::Order::kInterleaved}) {
    Batcher em(mem.validation, 64, order), es(sh.validation, 64, order);
    for (int64_t i = 0; i < em.batches_per_epoch(); ++i)
      expect_same_rows(em.next(), es.next(), "validation batch " + std::to_string(i));
  }
}

// The 32-bit epoch order a large shard split uses is the 64-bit one, entry for entry.
TEST(Shards, EpochOrderIn32BitsIsThe64BitOne) {
  for (int64_t n : {1, 2, 17, 1000, 100003}) {
    const auto a = seeded_permutation(n, 99 + uint64_t(n));
    const auto b = seeded_permutation32(n, 99 + uint64_t(n));
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], int64_t(b[i])) << "n " << n << ", entry " << i;
  }
}

// Resume from shards: a run stopped at step 4 and resumed gives the straight run's losses bit for bit, and a
// restored Batcher continues as the original.
TEST(Shards, ResumeIsExact) {
  const std::string dir = tmp_dir("resume");
  DataConfig c;
  c.corpus = "text:" + test::tiny_text_corpus();
  c.vocab_size = 128;
  c.seq_len = 16;
  c.validation_fraction = 0.2;
  c.heldout_genres = {};
  tokenize(c, dir + "/shards");

  auto cfg = load_run_config_text(
      "", "test",
      test::tiny_run_overrides(
          "shards_resume", {"train.steps=8", "moe.noisy=true", "data.corpus=\"shards:" + dir + "/shards\""}));
  std::ostringstream log;
  auto opts = [&](const std::string& name) {
    TrainOptions t;
    t.out_dir = dir + "/" + name;
    t.progress = false;
    return t;
  };
  auto straight = train_model(cfg, opts("straight"), log);
  auto o = opts("halves");
  o.stop_after = 4;
  auto first = train_model(cfg, o, log);
  ASSERT_EQ(first.step, 4);
  o.stop_after = 0;
  o.resume = o.out_dir + "/checkpoints";
  auto second = train_model(cfg, o, log);
  ASSERT_EQ(second.step, 8);
  std::vector<double> joined = first.step_losses;
  joined.insert(joined.end(), second.step_losses.begin(), second.step_losses.end());
  ASSERT_EQ(joined.size(), straight.step_losses.size());
  // Same data order, RNG and state, single-threaded CPU arithmetic: bit-identical.
  for (size_t i = 0; i < joined.size(); ++i)
    EXPECT_EQ(joined[i], straight.step_losses[i]) << "step " << i + 1;

  DataConfig cs = c;
  cs.corpus = "shards:" + dir + "/shards";
  const DataBundle d = prepare_data(cs, nullptr, log);
  Batcher a(d.train, 4, 9, true);
  for (int i = 0; i < 7; ++i) a.next();
  Batcher b(d.train, 4, 9, true);
  b.restore(a.epoch(), a.position());
  for (int i = 0; i < 20; ++i)
    expect_same_rows(a.next(), b.next(), "after restore, batch " + std::to_string(i));
}

// Data parallelism over shards: the two ranks' slices of each global batch are its rows, in order, and over
// an epoch no window is visited twice.
TEST(Shards, TwoRankSlicesCoverTheGlobalBatchOnce) {
  const std::string dir = tmp_dir("ranks");
  write_file(dir + "/c.jsonl", jsonl_lines(600));
  tokenize(jsonl_config(dir + "/c.jsonl"), dir + "/shards");
  DataConfig cs = jsonl_config("");
  cs.corpus = "shards:" + dir + "/shards";
  std::ostringstream log;
  const DataBundle d = prepare_data(cs, nullptr, log);
  const int64_t b = 3, W = 2;
  Batcher batcher(d.train, W * b, 5, true);
  // Rows are told apart by (document, tokens): windows of one document differ in their tokens' positions.
  std::set<std::pair<int64_t, std::vector<int64_t>>> seen;
  for (int64_t step = 0; step < batcher.batches_per_epoch(); ++step) {
    const auto g = batcher.next();
    std::vector<torch::Tensor> parts;
    for (int r = 0; r < W; ++r) {
      const auto s = rank_slice(g, r, int(W));
      ASSERT_EQ(s.tokens.size(0), b);
      parts.push_back(s.tokens);
      for (int64_t i = 0; i < b; ++i) {
        auto row = s.tokens[i].contiguous();
        std::vector<int64_t> v(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
        v.push_back(step * 0);  // rows only, whatever the step
        EXPECT_TRUE(seen.insert({s.doc[i].item<int64_t>(), v}).second)
            << "a window visited twice in one epoch";
      }
    }
    ASSERT_TRUE(torch::cat(parts).equal(g.tokens)) << "step " << step;
  }
  EXPECT_EQ(int64_t(seen.size()), batcher.batches_per_epoch() * W * b);
}

// The streamed split is a function of each document's domain and id (not of the order or the rest of the
// corpus), and its validation share is the configured one within binomial noise.
TEST(Shards, HashSplitIsStableAndHasTheConfiguredShare) {
  const std::string dir = tmp_dir("split");
  write_file(dir + "/c.jsonl", jsonl_lines(6000));
  const auto m = tokenize(jsonl_config(dir + "/c.jsonl", {"d2"}), dir + "/a");
  EXPECT_EQ(m["splits"]["heldout"]["documents"], 2000);
  const double val = m["splits"]["validation"]["documents"].get<double>();
  // 4000 documents at p = 0.1: mean 400, sd 19; 5 sd either side.
  EXPECT_NEAR(val, 400, 95);
  EXPECT_EQ(m["splits"]["train"]["documents"].get<int64_t>() + int64_t(val), 4000);
  // The same corpus again gives the same folder, byte for byte (checksums).
  const auto m2 = tokenize(jsonl_config(dir + "/c.jsonl", {"d2"}), dir + "/b");
  EXPECT_EQ(m["files"], m2["files"]);
  EXPECT_EQ(m["tokenizer"]["trained_on"], "a seeded sample of the training documents");
}

// data.corpus = "jsonl:PATH" without a tokenize step reads the documents whole, as the other readers do.
TEST(Shards, SmallJsonlTrainsWithoutATokenizeStep) {
  const std::string dir = tmp_dir("jsonl_direct");
  write_file(dir + "/c.jsonl", jsonl_lines(300));
  DataConfig c = jsonl_config(dir + "/c.jsonl");
  c.dir = dir;
  const auto docs = load_corpus(c);
  ASSERT_EQ(docs.size(), 300u);
  EXPECT_EQ(docs[0].domain, "d0");
  EXPECT_EQ(docs[1].id, "000000000002");  // the line number
  std::ostringstream log;
  const DataBundle d = prepare_data(c, nullptr, log);
  EXPECT_GT(d.train.size(), 0);
  EXPECT_EQ(d.train.domains, (std::vector<std::string>{"d0", "d1", "d2"}));
}

// .gz and .zst read through zlib and libzstd give the plain file's documents; a truncated one is an error.
TEST(Shards, GzipAndZstdReadAsThePlainFile) {
  const std::string dir = tmp_dir("compressed");
  // 30,000 lines, ~2.5 MB: more than one read of the line reader (1 MiB) and of zstd's output.
  const std::string text = jsonl_lines(30000);
  write_file(dir + "/c.jsonl", text);
  {
    gzFile g = gzopen((dir + "/c.jsonl.gz").c_str(), "wb");
    ASSERT_NE(g, nullptr);
    ASSERT_EQ(gzwrite(g, text.data(), unsigned(text.size())), int(text.size()));
    gzclose(g);
  }
  std::string zst(ZSTD_compressBound(text.size()), '\0');
  const size_t n = ZSTD_compress(zst.data(), zst.size(), text.data(), text.size(), 3);
  ASSERT_FALSE(ZSTD_isError(n));
  zst.resize(n);
  write_file(dir + "/c.jsonl.zst", zst);
  auto read_all = [](const std::string& spec) {
    std::vector<std::string> out;
    stream_documents(spec, JsonlOptions{}, [&](Document&& d) { out.push_back(d.domain + "|" + d.text); });
    return out;
  };
  const auto plain = read_all("jsonl:" + dir + "/c.jsonl");
  ASSERT_EQ(plain.size(), 30000u);
  EXPECT_EQ(read_all("jsonl:" + dir + "/c.jsonl.gz"), plain);
  EXPECT_EQ(read_all("jsonl:" + dir + "/c.jsonl.zst"), plain);
  write_file(dir + "/cut.jsonl.zst", zst.substr(0, zst.size() / 2));
  expect_file_error([&] { read_all("jsonl:" + dir + "/cut.jsonl.zst"); }, {"cut.jsonl.zst", "truncated"});
  std::ifstream gz(dir + "/c.jsonl.gz", std::ios::binary);
  const std::string gzb((std::istreambuf_iterator<char>(gz)), std::istreambuf_iterator<char>());
  write_file(dir + "/cut.jsonl.gz", gzb.substr(0, gzb.size() / 2));
  expect_file_error([&] { read_all("jsonl:" + dir + "/cut.jsonl.gz"); }, {"cut.jsonl.gz"});
}

// Bad lines: a malformed JSON line, a line without the text key and invalid UTF-8 stop the read naming the
// line, or with data.bad_lines = "skip" are left out and counted in the manifest; empty documents are left
// out and counted either way.
TEST(ShardsBadInput, BadLinesStopOrAreSkippedAndCounted) {
  const std::string dir = tmp_dir("bad_lines");
  const std::string good = jsonl_lines(400);
  struct Case {
    std::string line, expect, count_key;
  };
  const std::vector<Case> cases = {
      {"{\"text\": \"cut off", "not JSON", "bad_lines"},
      {"{\"body\": \"no text key here\"}", "\"text\"", "bad_lines"},
      {"{\"text\": 42}", "\"text\"", "bad_lines"},
      {"[\"an array\"]", "not a JSON object", "bad_lines"},
      {std::string("{\"text\": \"bad \xff\xfe bytes\"}"), "UTF-8", "not_utf8"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = dir + "/c" + std::to_string(i) + ".jsonl";
    // The bad line is line 201, between good ones; an empty document (line 202) too.
    const auto cut = good.find('\n', good.size() / 2);
    write_file(path,
               good.substr(0, cut + 1) + cases[i].line + "\n{\"text\": \"   \"}\n" + good.substr(cut + 1));
    const int64_t line = std::count(good.begin(), good.begin() + long(cut) + 1, '\n') + 1;
    DataConfig c = jsonl_config(path);
    expect_file_error([&] { tokenize(c, dir + "/stop" + std::to_string(i)); },
                      {path + ":" + std::to_string(line), cases[i].expect});
    EXPECT_FALSE(fs::exists(dir + "/stop" + std::to_string(i))) << "a failed tokenize leaves no folder";
    c.bad_lines = "skip";
    const auto m = tokenize(c, dir + "/skip" + std::to_string(i));
    EXPECT_EQ(m["read"][cases[i].count_key], 1) << cases[i].line << "\n" << m["read"].dump();
    EXPECT_EQ(m["read"]["empty"], 1);
    EXPECT_EQ(m["read"]["documents"], 400);
  }
  // A corpus of empty documents only.
  write_file(dir + "/empty.jsonl", "{\"text\": \"\"}\n{\"text\": \"\\n\\t \"}\n");
  expect_file_error([&] { tokenize(jsonl_config(dir + "/empty.jsonl"), dir + "/empty"); }, {"empty.jsonl"});
  // Another text key, from the config.
  write_file(dir + "/body.jsonl", "{\"body\": \"words of a document\"}\n");
  DataConfig c = jsonl_config(dir + "/body.jsonl");
  c.jsonl_text_key = "body";
  std::vector<std::string> texts;
  stream_documents(c.corpus, jsonl_options(c), [&](Document&& d) { texts.push_back(d.text); });
  EXPECT_EQ(texts, std::vector<std::string>{"words of a document"});
}

// A truncated or corrupted shard is a named error when the folder is opened, never a wrong batch; so is a
// hand-made shard whose checksums agree but whose ids are past the vocabulary.
TEST(ShardsBadInput, TruncatedOrCorruptedShardIsNamed) {
  const std::string dir = tmp_dir("corrupt");
  write_file(dir + "/c.jsonl", jsonl_lines(300));
  const std::string good = dir + "/good";
  tokenize(jsonl_config(dir + "/c.jsonl"), good);
  EXPECT_NO_THROW(open_shards(good));
  auto copy = [&](const std::string& name) {
    fs::copy(good, dir + "/" + name, fs::copy_options::recursive);
    return dir + "/" + name;
  };
  const std::string cut = copy("cut");
  fs::resize_file(cut + "/train.bin", fs::file_size(cut + "/train.bin") - 2);
  expect_file_error([&] { open_shards(cut); }, {"train.bin", "truncated"});
  const std::string flip = copy("flip");
  {
    std::fstream f(flip + "/train.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('\x7f');
  }
  expect_file_error([&] { open_shards(flip); }, {"train.bin", "checksum"});
  const std::string gone = copy("gone");
  fs::remove(gone + "/validation.idx");
  expect_file_error([&] { open_shards(gone); }, {"validation.idx"});
  const std::string junk = copy("junk");
  write_file(junk + "/manifest.json", "{\"format\": ");
  expect_file_error([&] { open_shards(junk); }, {"manifest.json"});
  expect_file_error([&] { open_shards(dir + "/nowhere"); }, {"nowhere", "no such shard folder"});

  // Ids past the vocabulary with checksums that agree: the manifest rewritten for the changed file.
  const std::string big = copy("big");
  {
    std::fstream f(big + "/train.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(10);
    const char id[2] = {'\xff', '\x7f'};  // 32767 > 128 pieces
    f.write(id, 2);
  }
  auto m = nlohmann::json::parse(std::ifstream(big + "/manifest.json"));
  std::ifstream bin(big + "/train.bin", std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(bin)), std::istreambuf_iterator<char>());
  m["files"]["train.bin"]["crc32"] =
      uint32_t(crc32(0L, reinterpret_cast<const Bytef*>(bytes.data()), uInt(bytes.size())));
  write_file(big + "/manifest.json", m.dump());
  DataConfig cs = jsonl_config("");
  cs.corpus = "shards:" + big;
  std::ostringstream log;
  expect_file_error([&] { prepare_data(cs, nullptr, log); }, {"train.bin", "32767", "vocabulary"});
}

// Shards written with another tokenizer than the checkpoint's are refused, naming the folder's tokenizer;
// --tokenizer <folder> reuses a tokenizer, and then the same check passes.
TEST(ShardsBadInput, AnotherTokenizerThanTheCheckpointsIsNamed) {
  const std::string dir = tmp_dir("tokenizer");
  write_file(dir + "/c.jsonl", jsonl_lines(300));
  write_file(
      dir + "/other.jsonl",
      "{\"text\": \"quite different words: zebra, quartz, violin, kayak, jigsaw\"}\n" + jsonl_lines(200));
  tokenize(jsonl_config(dir + "/c.jsonl"), dir + "/a");
  tokenize(jsonl_config(dir + "/other.jsonl"), dir + "/b");
  const auto a = open_shards(dir + "/a"), b = open_shards(dir + "/b");
  ASSERT_NE(a.tokenizer_model, b.tokenizer_model);
  DataConfig cs = jsonl_config("");
  cs.corpus = "shards:" + dir + "/b";
  std::ostringstream log;
  expect_file_error([&] { prepare_data(cs, &a.tokenizer_model, log); },
                    {dir + "/b/tokenizer.model", "another tokenizer"});
  // Reuse a's tokenizer for the other corpus: the check passes.
  const auto m = tokenize(jsonl_config(dir + "/other.jsonl"), dir + "/c", dir + "/a");
  EXPECT_EQ(m["tokenizer"]["given"], dir + "/a");
  cs.corpus = "shards:" + dir + "/c";
  EXPECT_NO_THROW(prepare_data(cs, &a.tokenizer_model, log));
}

// An output folder that exists is refused (a shard folder is written whole into a new one); a writer that
// does not finish leaves neither the folder nor its temporary; a longer data.seq_len than any document is a
// named config error.
TEST(ShardsBadInput, ExistingOutputUnfinishedWriteAndTooLongSequences) {
  const std::string dir = tmp_dir("existing");
  write_file(dir + "/c.jsonl", jsonl_lines(100));
  fs::create_directories(dir + "/out");
  expect_file_error([&] { tokenize(jsonl_config(dir + "/c.jsonl"), dir + "/out"); },
                    {dir + "/out", "exists"});
  {
    const auto tok = Tokenizer::from_serialized((tokenize(jsonl_config(dir + "/c.jsonl"), dir + "/done"),
                                                 open_shards(dir + "/done").tokenizer_model));
    ShardWriter w(dir + "/unfinished", tok);
    w.add("train", "d0", {1, 2, 3});
  }  // destroyed without finish(): a crash before the rename
  EXPECT_FALSE(fs::exists(dir + "/unfinished"));
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find("unfinished.tmp"), std::string::npos) << e.path();
  DataConfig cs = jsonl_config("");
  cs.corpus = "shards:" + dir + "/done";
  cs.seq_len = 4096;
  std::ostringstream log;
  test::expect_config_error([&] { prepare_data(cs, nullptr, log); }, "data.seq_len");
  // Held-out domains the corpus does not have.
  test::expect_config_error([&] { tokenize(jsonl_config(dir + "/c.jsonl", {"humor"}), dir + "/h"); },
                            "data.heldout_genres");
}

}  // namespace
}  // namespace moeforge
