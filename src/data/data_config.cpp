#include "moeforge/data/data_config.h"

#include <cmath>
#include <set>

#include "moeforge/config/binder.h"
#include "moeforge/data/corpus.h"
#include "moeforge/data/instruct.h"
#include "moeforge/util/error.h"

namespace moeforge {

void DataConfig::validate() const {
  const bool is_text = corpus.rfind("text:", 0) == 0;
  const bool is_instruct = corpus == "instruct";
  const bool is_jsonl = corpus.rfind("jsonl:", 0) == 0, is_shards = corpus.rfind("shards:", 0) == 0;
  if (corpus != "brown" && !is_text && !is_instruct && !is_jsonl && !is_shards)
    throw ConfigError("data.corpus", "unknown corpus '" + clipped(corpus) +
                                         "' (expected \"brown\", \"text:PATH\", \"jsonl:PATH\", "
                                         "\"shards:DIR\" or \"instruct\")");
  if ((is_text && corpus.size() == 5) || (is_jsonl && corpus.size() == 6) ||
      (is_shards && corpus.size() == 7))
    throw ConfigError("data.corpus", "\"" + corpus + "\" needs a path after the colon");
  if (jsonl_text_key.empty()) throw ConfigError("data.jsonl_text_key", "must name the key of a line's text");
  if (jsonl_domain_key.empty())
    throw ConfigError("data.jsonl_domain_key",
                      "must name the key of a line's domain (absent in a line: \"text\")");
  if (bad_lines != "stop" && bad_lines != "skip")
    throw ConfigError("data.bad_lines", "must be \"stop\" or \"skip\", got '" + clipped(bad_lines) + "'");
  if (tokenizer_sample_mb < 1 || tokenizer_sample_mb > 65536)
    throw ConfigError("data.tokenizer_sample_mb",
                      "must be in [1, 65536], got " + std::to_string(tokenizer_sample_mb));
  if (is_instruct) {
    check_instruct_tasks(*this);
    if (!heldout_genres.empty())
      throw ConfigError("data.heldout_genres",
                        "the instruct corpus holds out tasks, not genres: use data.instruct_heldout");
    if (instruct_train_per_task < 1)
      throw ConfigError("data.instruct_train_per_task",
                        "must be >= 1, got " + std::to_string(instruct_train_per_task));
    if (instruct_eval_per_task < 1)
      throw ConfigError("data.instruct_eval_per_task",
                        "must be >= 1, got " + std::to_string(instruct_eval_per_task));
    if (wordnet_dir.empty())
      throw ConfigError("data.wordnet_dir", "must name WordNet's folder (e.g. \"/usr/share/wordnet\")");
  }
  if ((corpus == "brown" || is_instruct) && dir.empty())
    throw ConfigError("data.dir", "must name the folder that holds brown/ (e.g. \"data\")");
  // 0 would leave nothing to evaluate: evaluation, the checkpoints' cadence and the report all read the
  // validation split.
  if (!std::isfinite(validation_fraction) || validation_fraction <= 0 || validation_fraction >= 1)
    throw ConfigError(
        "data.validation_fraction",
        "must be in (0, 1): the share of each training genre's documents that evaluation measures, "
        "got " +
            std::to_string(validation_fraction));
  // SentencePiece needs room for its 3 special pieces plus every character of the corpus (~80 in Brown).
  if (vocab_size < 100 || vocab_size > (int64_t{1} << 20))
    throw ConfigError("data.vocab_size", "must be in [100, 1048576], got " + std::to_string(vocab_size));
  // The model's RoPE table holds seq_len x head_dim / 2 angles, built before any weight is read: the
  // bound keeps a hostile checkpoint config from asking for terabytes (docs/reliability.md).
  if (seq_len < 1 || seq_len > (int64_t{1} << 20))
    throw ConfigError("data.seq_len", "must be in [1, 1048576], got " + std::to_string(seq_len));
  if (seed < 0) throw ConfigError("data.seed", "must be >= 0, got " + std::to_string(seed));
  if (corpus == "brown") {
    std::set<char> letters;  // genres named twice (by letter and by name) count once
    for (const auto& g : heldout_genres) {
      bool known = false;
      for (const auto& [letter, name] : brown_genres()) {
        if (g == name || g == std::string(1, letter)) {
          known = true;
          letters.insert(letter);
        }
      }
      if (!known) {
        std::string all;
        for (const auto& kv : brown_genres()) all += (all.empty() ? "" : ", ") + kv.second;
        throw ConfigError("data.heldout_genres",
                          "unknown Brown genre '" + g + "' (expected a letter a..r or one of: " + all + ")");
      }
    }
    if (letters.size() == brown_genres().size())
      throw ConfigError("data.heldout_genres", "holds out every genre, leaving nothing to train on");
  }
}

void bind_data_config(ConfigBinder& b, DataConfig* c) {
  b.bind("data.corpus", &c->corpus);
  b.bind("data.dir", &c->dir);
  b.bind("data.heldout_genres", &c->heldout_genres);
  b.bind("data.validation_fraction", &c->validation_fraction);
  b.bind("data.vocab_size", &c->vocab_size);
  b.bind("data.seq_len", &c->seq_len);
  b.bind("data.seed", &c->seed);
  b.bind("data.byte_fallback", &c->byte_fallback);
  b.bind("data.jsonl_text_key", &c->jsonl_text_key);
  b.bind("data.jsonl_domain_key", &c->jsonl_domain_key);
  b.bind("data.bad_lines", &c->bad_lines);
  b.bind("data.tokenizer_sample_mb", &c->tokenizer_sample_mb);
  b.bind("data.instruct_tasks", &c->instruct_tasks);
  b.bind("data.instruct_heldout", &c->instruct_heldout);
  b.bind("data.instruct_train_per_task", &c->instruct_train_per_task);
  b.bind("data.instruct_eval_per_task", &c->instruct_eval_per_task);
  b.bind("data.instruct_pack", &c->instruct_pack);
  b.bind("data.wordnet_dir", &c->wordnet_dir);
}

}  // namespace moeforge
