// Preparing a run's data (prepare.h).
#include "moeforge/data/prepare.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iomanip>
#include <sstream>
#include <tuple>

#include "moeforge/data/shards.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {

std::string seconds_since(std::chrono::steady_clock::time_point t0) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1)
     << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return os.str();
}

// data.corpus = "shards:DIR": the splits read memory-mapped, the tokenizer the shards were written with.
DataBundle prepare_shards(const DataConfig& cfg, const std::string* tokenizer_model, std::ostream& log) {
  const std::string dir = cfg.corpus.substr(7);
  const auto t0 = std::chrono::steady_clock::now();
  ShardSet set = open_shards(dir);
  if (tokenizer_model && *tokenizer_model != set.tokenizer_model)
    throw FileError(
        dir + "/tokenizer.model",
        "these shards were written with another tokenizer than the checkpoint's: their ids mean other "
        "pieces (tokenize the corpus again with --tokenizer <checkpoint>)");
  DataBundle d;
  d.tokenizer = Tokenizer::from_serialized(set.tokenizer_model);
  d.split.domains = set.domains;
  // Ids past the tokenizer's vocabulary would index past the embedding: a named error instead (the checksums
  // vouch for the bytes, not for the hand that wrote them).
  for (const auto& split : {set.train, set.validation, set.heldout})
    if (split && split->max_id() >= uint32_t(d.tokenizer->vocab_size()))
      throw FileError(split->bin_path(), "holds token id " + std::to_string(split->max_id()) +
                                             ", past the vocabulary of its tokenizer.model (" +
                                             std::to_string(d.tokenizer->vocab_size()) + " pieces)");
  for (const auto& [split, packed] :
       {std::pair{set.train, &d.train}, {set.validation, &d.validation}, {set.heldout, &d.heldout}}) {
    packed->domains = set.domains;
    if (split) packed->shards = std::make_shared<ShardWindows>(split, cfg.seq_len);
  }
  auto docs = [&](const char* name) {
    const auto& s = set.manifest["splits"];
    return s.contains(name) ? s[name].value("documents", int64_t{0}) : int64_t{0};
  };
  for (const auto& [name, packed] : {std::pair{"training", &d.train}, {"validation", &d.validation}})
    if (packed->size() == 0)
      throw ConfigError("data.seq_len",
                        std::string("the ") + name + " split of " + dir +
                            " has no sequence of data.seq_len + 1 = " + std::to_string(cfg.seq_len + 1) +
                            " tokens: lower data.seq_len, or tokenize a larger corpus");
  log << "data: shards " << dir << ": " << docs("train") << "/" << docs("validation") << "/"
      << docs("heldout") << " documents (train/validation/held-out), " << d.train.size()
      << " training sequences of " << cfg.seq_len << " tokens, tokenizer of " << d.tokenizer->vocab_size()
      << " pieces (" << seconds_since(t0) << " s)\n";
  return d;
}

}  // namespace

DataBundle prepare_data(const DataConfig& cfg, const std::string* tokenizer_model, std::ostream& log) {
  if (cfg.corpus.rfind("shards:", 0) == 0) return prepare_shards(cfg, tokenizer_model, log);
  DataBundle d;
  if (cfg.corpus == "instruct") {
    const auto t0 = std::chrono::steady_clock::now();
    d.instruct = generate_instruct(cfg);
    d.split = instruct_corpus_split(*d.instruct, cfg);
    log << "instruct: " << d.instruct->tasks.size() << " tasks (" << d.instruct->heldout.size()
        << " held out), " << d.instruct->train.size() << "/" << d.instruct->validation.size() << "/"
        << d.instruct->test.size() << " samples (train/validation/test) (" << seconds_since(t0) << " s)\n";
  } else {
    d.split = split_corpus(load_corpus(cfg), cfg);
  }
  if (tokenizer_model) {
    d.tokenizer = Tokenizer::from_serialized(*tokenizer_model);
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    d.tokenizer = train_or_load_tokenizer(d.split, cfg, (fs::path(cfg.dir) / "cache").string());
    log << "tokenizer: " << d.tokenizer->vocab_size() << " pieces (" << seconds_since(t0) << " s)\n";
  }
  if (d.instruct) {
    // `heldout` is the test samples of the held-out tasks (instruct_corpus_split); the trained tasks' test
    // samples are for the final evaluation only.
    std::vector<InstructSample> heldout;
    for (const auto& s : d.instruct->test)
      if (std::count(d.instruct->heldout.begin(), d.instruct->heldout.end(), s.task)) heldout.push_back(s);
    const auto& doms = d.split.domains;
    d.train = pack_samples(d.instruct->train, *d.tokenizer, cfg.seq_len, doms, cfg.instruct_pack);
    d.validation = pack_samples(d.instruct->validation, *d.tokenizer, cfg.seq_len, doms, cfg.instruct_pack);
    if (!heldout.empty())
      d.heldout = pack_samples(heldout, *d.tokenizer, cfg.seq_len, doms, cfg.instruct_pack);
    const int64_t dropped =
        d.train.dropped + d.validation.dropped + (heldout.empty() ? 0 : d.heldout.dropped);
    if (dropped > 0)
      log << "instruct: " << dropped << " samples longer than data.seq_len + 1 = " << cfg.seq_len + 1
          << " tokens left out (" << d.train.dropped << " of them training samples)\n";
  } else {
    d.train = pack_documents(d.split.train, *d.tokenizer, cfg.seq_len, d.split.domains);
    d.validation = pack_documents(d.split.validation, *d.tokenizer, cfg.seq_len, d.split.domains);
    if (!d.split.heldout.empty())
      d.heldout = pack_documents(d.split.heldout, *d.tokenizer, cfg.seq_len, d.split.domains);
  }
  // A split without one window of seq_len + 1 tokens could not be batched: say which and why here, not as
  // the batcher's "no sequences".
  for (const auto& [name, packed, docs] : {std::tuple{"training", &d.train, d.split.train.size()},
                                           {"validation", &d.validation, d.split.validation.size()}})
    if (!packed->tokens.defined() || packed->size() == 0)
      throw ConfigError("data.seq_len", std::string("the ") + name + " split (" + std::to_string(docs) +
                                            " documents or samples) has no sequence of data.seq_len + 1 = " +
                                            std::to_string(cfg.seq_len + 1) +
                                            " tokens: lower data.seq_len, or use a larger corpus");
  log << "data: " << d.split.train.size() << "/" << d.split.validation.size() << "/" << d.split.heldout.size()
      << " documents (train/validation/held-out), " << d.train.size() << " training sequences of "
      << cfg.seq_len << " tokens\n";
  return d;
}

}  // namespace moeforge
