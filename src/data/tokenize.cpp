// `moeforge tokenize` (tokenize.h, docs/data.md "Your own corpus").
#include "moeforge/data/tokenize.h"

#include <ATen/Parallel.h>
#include <signal.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "moeforge/data/batching.h"
#include "moeforge/data/corpus.h"
#include "moeforge/data/jsonl.h"
#include "moeforge/data/random.h"
#include "moeforge/data/shards.h"
#include "moeforge/data/tokenizer.h"
#include "moeforge/util/error.h"
#include "moeforge/util/progress.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string mb_per_s(uint64_t bytes, double seconds) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1) << double(bytes) / 1e6 / std::max(seconds, 1e-9) << " MB/s";
  return os.str();
}

// A progress bar over the bytes of the input, with the rate.
class ByteProgress {
 public:
  ByteProgress(const std::string& label, std::ostream& log, bool enabled)
      : label_(label), log_(log), on_(enabled) {}
  void operator()(uint64_t done, uint64_t total) {
    if (!on_) return;
    if (!bar_) bar_ = std::make_unique<ProgressBar>(label_, int64_t(std::max<uint64_t>(total, 1)), log_);
    bar_->update(int64_t(std::min(done, total)), mb_per_s(done, seconds_since(t0_)));
  }
  void finish(uint64_t total) {
    if (bar_) bar_->finish(mb_per_s(total, seconds_since(t0_)));
  }

 private:
  std::string label_;
  std::ostream& log_;
  bool on_;
  std::unique_ptr<ProgressBar> bar_;
  Clock::time_point t0_ = Clock::now();
};

// The held-out domains of a streamed corpus: data.heldout_genres by name (their presence is checked once the
// corpus has been read, since no domain list exists before).
// FNV-1a's last bytes reach its high bits through one multiply only, so the ids of consecutive lines
// ("000000000041", "000000000042") would hash to nearby values; splitmix64's finaliser spreads every input
// bit over the whole word before a hash is read as a uniform number.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct StreamSplit {
  std::set<std::string> heldout;
  double validation_fraction;
  uint64_t seed;

  // A document's split, from its domain and id only: the same document lands in the same split whatever
  // else the corpus holds and in whichever order it is read.
  const char* of(const Document& d) const {
    if (heldout.count(d.domain)) return "heldout";
    const uint64_t h = mix64(fnv1a64(d.domain + "\n" + d.id, seed ^ 0x5851F42D4C957F2Dull));
    const double u = double(h >> 11) * 0x1.0p-53;  // uniform in [0, 1)
    return u < validation_fraction ? "validation" : "train";
  }
};

// A seeded sample of documents within a byte budget: each document draws a key from its id; the sample keeps
// the documents of the smallest keys that fit (bottom-k by bytes), so it is uniform over documents, bounded,
// and the same for the same corpus and seed.
class TokenizerSample {
 public:
  TokenizerSample(uint64_t budget, uint64_t seed) : budget_(budget), seed_(seed) {}
  void offer(const Document& d) {
    const uint64_t key = mix64(fnv1a64(d.domain + "\n" + d.id, seed_ ^ 0xD1B54A32D192ED03ull));
    const uint64_t size = std::min<uint64_t>(d.text.size(), budget_);
    while (bytes_ + size > budget_ && !kept_.empty() && kept_.rbegin()->first > key) {
      bytes_ -= kept_.rbegin()->second.size();
      kept_.erase(std::prev(kept_.end()));
    }
    if (bytes_ + size > budget_) return;
    kept_.emplace(key, d.text.substr(0, size_t(size)));
    bytes_ += size;
  }
  std::vector<std::string> texts() const {
    std::vector<std::string> out;
    for (const auto& [key, text] : kept_) out.push_back(text);
    return out;
  }
  uint64_t bytes() const { return bytes_; }
  size_t documents() const { return kept_.size(); }

 private:
  uint64_t budget_, seed_, bytes_ = 0;
  std::multimap<uint64_t, std::string> kept_;
};

// A given tokenizer: a .model file or a folder with tokenizer.model.
Tokenizer given_tokenizer(const std::string& path) {
  std::error_code ec;
  const std::string file = fs::is_directory(path, ec) ? (fs::path(path) / "tokenizer.model").string() : path;
  return Tokenizer::load(file);
}

// Documents are encoded a group at a time on every thread, then written in their order.
class ParallelEncoder {
 public:
  ParallelEncoder(const Tokenizer& tok, ShardWriter& out) : tok_(tok), out_(out) {}
  void add(const char* split, Document&& d) {
    bytes_ += d.text.size();
    docs_.push_back({split, std::move(d)});
    if (bytes_ >= (size_t(16) << 20) || docs_.size() >= 8192) flush();
  }
  void flush() {
    std::vector<std::vector<int64_t>> ids(docs_.size());
    at::parallel_for(0, int64_t(docs_.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) ids[size_t(i)] = encode_document(tok_, docs_[size_t(i)].second.text);
    });
    for (size_t i = 0; i < docs_.size(); ++i) out_.add(docs_[i].first, docs_[i].second.domain, ids[i]);
    docs_.clear();
    bytes_ = 0;
  }

 private:
  const Tokenizer& tok_;
  ShardWriter& out_;
  std::vector<std::pair<const char*, Document>> docs_;
  size_t bytes_ = 0;
};

nlohmann::json counts_json(const ReadCounts& c) {
  return {{"documents", c.documents}, {"bad_lines", c.bad_lines}, {"long_lines", c.cut_lines},
          {"empty", c.empty},         {"not_utf8", c.not_text},   {"input_bytes", c.input_bytes}};
}

// Brown: split and tokenizer exactly as prepare_data makes them, documents written in the packer's order.
// How the folder was split, for the manifest.
nlohmann::json split_json(const DataConfig& cfg, const std::string& method) {
  return {{"method", method},
          {"validation_fraction", cfg.validation_fraction},
          {"heldout_genres", cfg.heldout_genres},
          {"seed", cfg.seed}};
}

// Every held-out domain must be one of the corpus's (a misspelt name would hold nothing out).
void check_heldout_domains(const DataConfig& cfg, const std::set<std::string>& seen) {
  for (const auto& g : cfg.heldout_genres)
    if (!seen.count(g)) {
      std::string names;
      for (const auto& d : seen) names += (names.empty() ? "" : ", ") + d;
      throw ConfigError("data.heldout_genres", "unknown domain '" + g + "' (this corpus has: " + names +
                                                   "; --set data.heldout_genres=[] holds none out)");
    }
}

nlohmann::json tokenize_brown(const TokenizeOptions& opt, std::ostream& log) {
  const DataConfig& cfg = opt.data;
  CorpusSplit split = split_corpus(load_corpus(cfg), cfg);
  nlohmann::json tok_info;
  std::optional<Tokenizer> tok;
  if (!opt.tokenizer.empty()) {
    tok = given_tokenizer(opt.tokenizer);
    tok_info = {{"given", opt.tokenizer}};
  } else {
    tok = train_or_load_tokenizer(split, cfg, (fs::path(cfg.dir) / "cache").string());
    tok_info = {{"trained_on", "the whole training split (as data.corpus = \"brown\" trains it)"}};
  }
  log << "tokenizer: " << tok->vocab_size() << " pieces (" << tok_info.begin().key() << ")\n";
  ShardWriter out(opt.out_dir, *tok);
  ParallelEncoder enc(*tok, out);
  int64_t docs = 0;
  for (const auto& [name, list] :
       {std::pair{"train", &split.train}, {"validation", &split.validation}, {"heldout", &split.heldout}})
    for (Document& d : *list) {
      enc.add(name, std::move(d));
      ++docs;
    }
  enc.flush();
  nlohmann::json extra = {{"corpus", cfg.corpus},
                          {"split", split_json(cfg, "split_corpus (per-domain seeded permutation)")},
                          {"tokenizer", tok_info},
                          {"read", {{"documents", docs}}}};
  // Every Brown genre has documents in some split (the held-out ones in heldout), so the folder's domains
  // are the in-memory corpus's 15.
  return out.finish(extra);
}

}  // namespace

nlohmann::json tokenize_corpus(const TokenizeOptions& opt, std::ostream& log) {
  const DataConfig& cfg = opt.data;
  cfg.validate();
  const auto t0 = Clock::now();
  {
    std::error_code ec;
    if (fs::exists(opt.out_dir, ec))
      throw FileError(opt.out_dir,
                      "exists: a shard folder is written whole into a new folder (remove it, or give "
                      "another --out)");
  }
  if (cfg.corpus == "brown") {
    auto m = tokenize_brown(opt, log);
    log << "tokenize: " << m["read"]["documents"] << " documents, " << seconds_since(t0) << " s\n";
    return m;
  }
  if (cfg.corpus.rfind("jsonl:", 0) != 0 && cfg.corpus.rfind("text:", 0) != 0)
    throw ConfigError("--corpus", "'" + clipped(cfg.corpus) +
                                      "' cannot be tokenized: expected \"brown\", "
                                      "\"text:DIR\" or \"jsonl:PATH\"");
  const JsonlOptions jopt = jsonl_options(cfg);
  StreamSplit split{std::set<std::string>(cfg.heldout_genres.begin(), cfg.heldout_genres.end()),
                    cfg.validation_fraction, uint64_t(cfg.seed)};

  // Pass 1 (without a given tokenizer): the tokenizer's sample of the training documents.
  std::optional<Tokenizer> tok;
  nlohmann::json tok_info;
  std::set<std::string> seen;  // the corpus's domains
  if (!opt.tokenizer.empty()) {
    tok = given_tokenizer(opt.tokenizer);
    tok_info = {{"given", opt.tokenizer}};
  } else {
    const uint64_t budget = uint64_t(cfg.tokenizer_sample_mb) << 20;
    TokenizerSample sample(budget, uint64_t(cfg.seed));
    ByteProgress bar("sample", log, opt.progress);
    const auto t1 = Clock::now();
    const ReadCounts c = stream_documents(
        cfg.corpus, jopt,
        [&](Document&& d) {
          seen.insert(d.domain);
          if (std::string(split.of(d)) == "train") sample.offer(d);
        },
        [&](uint64_t done, uint64_t total) { bar(done, total); });
    bar.finish(c.input_bytes);
    check_heldout_domains(cfg, seen);  // before the tokenizer and the second pass, not after them
    if (sample.documents() == 0)
      throw FileError(cfg.corpus.substr(cfg.corpus.find(':') + 1),
                      "has no training document to train a tokenizer on (" + std::to_string(c.documents) +
                          " documents read)");
    log << "tokenizer: training on a seeded sample of " << sample.documents() << " training documents ("
        << std::fixed << std::setprecision(1) << double(sample.bytes()) / 1e6
        << " MB, data.tokenizer_sample_mb = " << cfg.tokenizer_sample_mb << ") read in " << seconds_since(t1)
        << " s\n";
    const auto t2 = Clock::now();
    tok = Tokenizer::train(sample.texts(), cfg.vocab_size, uint64_t(cfg.seed), cfg.byte_fallback);
    log << "tokenizer: " << tok->vocab_size() << " pieces (" << seconds_since(t2) << " s)\n";
    tok_info = {{"trained_on", "a seeded sample of the training documents"},
                {"sample_documents", sample.documents()},
                {"sample_bytes", sample.bytes()},
                {"tokenizer_sample_mb", cfg.tokenizer_sample_mb},
                {"vocab_size", cfg.vocab_size},
                {"byte_fallback", cfg.byte_fallback},
                {"seed", cfg.seed}};
  }

  // Pass 2: every document, split, encoded, written.
  ShardWriter out(opt.out_dir, *tok);
  ParallelEncoder enc(*tok, out);
  ByteProgress bar("tokenize", log, opt.progress);
  const auto t3 = Clock::now();
  const ReadCounts c = stream_documents(
      cfg.corpus, jopt,
      [&](Document&& d) {
        seen.insert(d.domain);
        const char* s = split.of(d);
        enc.add(s, std::move(d));
      },
      [&](uint64_t done, uint64_t total) { bar(done, total); });
  enc.flush();
  bar.finish(c.input_bytes);
  const double secs = seconds_since(t3);
  check_heldout_domains(cfg, seen);
  if (c.documents == 0) throw FileError(cfg.corpus.substr(cfg.corpus.find(':') + 1), "holds no document");
  nlohmann::json extra = {
      {"corpus", cfg.corpus},
      {"split", split_json(cfg, "seeded hash of each document's domain and id")},
      {"tokenizer", tok_info},
      {"read", counts_json(c)},
      {"jsonl",
       {{"text_key", jopt.text_key}, {"domain_key", jopt.domain_key}, {"bad_lines", cfg.bad_lines}}}};
  auto m = out.finish(extra);
  log << "tokenize: " << c.documents << " documents, " << out.tokens() << " tokens from " << std::fixed
      << std::setprecision(1) << double(c.input_bytes) / 1e6 << " MB in " << secs << " s ("
      << mb_per_s(c.input_bytes, secs) << ")";
  if (c.bad_lines + c.empty + c.not_text > 0)
    log << "; left out: " << c.bad_lines << " bad lines, " << c.empty << " empty, " << c.not_text
        << " not UTF-8";
  log << "\n";
  return m;
}

}  // namespace moeforge
