// `moeforge tokenize`: a corpus of any size turned into a shard folder (data/shards.h) with bounded memory
// (docs/data.md, "Your own corpus").
#pragma once

#include <ostream>
#include <string>

#include <nlohmann/json.hpp>

#include "moeforge/data/data_config.h"

namespace moeforge {

struct TokenizeOptions {
  // data.corpus ("brown", "text:DIR", "jsonl:PATH"), the split (validation_fraction, heldout_genres, seed),
  // the tokenizer's vocab_size, byte_fallback and tokenizer_sample_mb, the JSON-lines keys and bad_lines.
  DataConfig data;
  std::string out_dir;
  // A SentencePiece model to use instead of training one: a .model file, or a folder holding
  // tokenizer.model (a checkpoint or another shard folder). Empty: train one.
  std::string tokenizer;
  bool progress = true;  // progress bars on the log stream
};

// Reads the corpus as a stream and writes the shard folder; returns its manifest. Brown is split as
// split_corpus splits it and its tokenizer is the one training on "brown" trains (so its shards batch exactly
// as the in-memory corpus); a jsonl: or text: corpus is split document by document by a seeded hash and its
// tokenizer is trained on a seeded sample of at most data.tokenizer_sample_mb MB of its training documents.
nlohmann::json tokenize_corpus(const TokenizeOptions& opt, std::ostream& log);

}  // namespace moeforge
