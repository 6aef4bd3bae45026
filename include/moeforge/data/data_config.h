// The [data] section of a moeforge config: which corpus, how it is split, the tokenizer's size and the
// length of packed training sequences.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

struct DataConfig {
  // data.corpus: "brown", "text:PATH" (a folder of .txt files), "jsonl:PATH" (JSON lines, read whole: for
  // small files), "shards:DIR" (what `moeforge tokenize` wrote, memory-mapped; docs/data.md) or "instruct"
  // (docs/instruct-data.md)
  std::string corpus = "brown";
  std::string dir = "data";  // data.dir: the folder holding brown/ (relative to the cwd)
  std::vector<std::string> heldout_genres =
      {};                             // data.heldout_genres: genre names or letters kept out of training
  double validation_fraction = 0.05;  // data.validation_fraction: share of each training genre's documents
  int64_t vocab_size = 2048;          // data.vocab_size: SentencePiece BPE vocabulary
  int64_t seq_len = 128;              // data.seq_len: tokens per packed sequence
  int64_t seed = 1234;                // data.seed: seeds the split and the tokenizer's sampling
  // data.byte_fallback: 256 byte pieces <0x00>..<0xFF> in the vocabulary, so that characters outside it
  // become bytes instead of <unk>. llama.cpp's SentencePiece tokenizer needs them for any character it has
  // no piece for (docs/interop.md); they take 256 of vocab_size.
  bool byte_fallback = false;

  // JSON lines (data.corpus = "jsonl:PATH" and `moeforge tokenize`; docs/data.md): the keys of a line's text
  // and of its optional domain, and what a bad line does: "stop" (an error naming its line) or "skip" (left
  // out and counted).
  std::string jsonl_text_key = "text";      // data.jsonl_text_key
  std::string jsonl_domain_key = "domain";  // data.jsonl_domain_key
  std::string bad_lines = "stop";           // data.bad_lines
  // `moeforge tokenize` trains the tokenizer on a seeded sample of at most this many MB of training
  // documents (data.tokenizer_sample_mb), not on the whole corpus.
  int64_t tokenizer_sample_mb = 64;

  // data.corpus = "instruct" (docs/instruct-data.md): the tasks, those held out of training (test only),
  // and the samples per task in each split. WordNet is read from data.wordnet_dir (Debian's wordnet-base).
  std::vector<std::string> instruct_tasks = {"pos_tag",    "first_of_pos",  "genre",      "define",
                                             "synonym",    "antonym",       "hypernym",   "fill_blank",
                                             "word_class", "reverse_words", "sort_words", "count_words",
                                             "copy_upper", "add",           "subtract"};
  std::vector<std::string> instruct_heldout = {"first_of_pos", "antonym", "sort_words"};
  int64_t instruct_train_per_task = 1000;  // data.instruct_train_per_task
  int64_t instruct_eval_per_task = 100;    // data.instruct_eval_per_task: validation and test, each
  // data.instruct_pack: several samples of one task per sequence (never cut); false = one per sequence
  bool instruct_pack = true;
  std::string wordnet_dir = "/usr/share/wordnet";  // data.wordnet_dir

  // Throws ConfigError naming the field when a value is out of range. Held-out genres of a "brown" corpus
  // are checked here; those of a "text:" corpus can only be checked against its folders by split_corpus.
  void validate() const;
};

class ConfigBinder;
// Registers every [data] key of `cfg` under "data.<key>".
void bind_data_config(ConfigBinder& binder, DataConfig* cfg);

}  // namespace moeforge
