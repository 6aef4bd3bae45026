// Corpus readers and the fixed train / validation / held-out split.
//
// Two corpora: the Brown corpus ("brown": 500 tagged documents in 15 genres, read from <data.dir>/brown)
// and a plain folder of .txt files ("text:PATH": one document per file, the sub-folder name as domain, or
// "text" for files directly in PATH).
#pragma once

#include <string>
#include <vector>

#include "moeforge/data/data_config.h"

namespace moeforge {

struct Document {
  std::string id;      // Brown: the file name ("ca01"); text: the path relative to the corpus folder
  std::string domain;  // Brown: the genre name ("press_reportage"); text: the sub-folder name or "text"
  std::string text;    // Brown: tags stripped, tokens joined with ordinary spacing
};

// The longest line a corpus document keeps (docs/reliability.md, "Shared folders and limits"): longer
// ones are cut, at the last space before the limit when there is one, so that no per-line buffer of the
// tokenizer grows with the input.
constexpr size_t kMaxLineBytes = 64 * 1024;
// `text` with every line longer than `max_line` bytes cut into lines of at most that many (at a space, else
// at a UTF-8 character boundary). Text whose lines are all shorter comes back unchanged.
std::string cut_long_lines(std::string text, size_t max_line = kMaxLineBytes);
// The bytes of `text` that are not UTF-8 text: a NUL, or a byte of an invalid or truncated sequence.
struct NonText {
  size_t bytes = 0;                  // how many
  size_t first = std::string::npos;  // the offset of the first, npos when none
  double share(size_t total) const { return total ? double(bytes) / double(total) : 0.0; }
};
NonText non_text_bytes(const std::string& text);
// A text corpus file more than this share of whose bytes is not UTF-8 text is not text (an image, an
// archive): an error naming the file. Text with a few stray bytes (a Latin-1 word) is read, the tokenizer
// taking each as U+FFFD (docs/reliability.md, "Bad training data").
constexpr double kMaxNonTextShare = 0.3;
// A .txt file of a text corpus as a document's text: UTF-8 text (else a FileError naming the file and the
// first bad byte's offset), its lines cut to kMaxLineBytes.
std::string read_text_document(const std::string& path);

// The 15 Brown genres, indexed by their file letter ('a' -> "press_reportage"). Letters i, o and q are
// unused.
const std::vector<std::pair<char, std::string>>& brown_genres();

// Turns one Brown file's "word/tag" tokens into readable text: tags stripped, `` and '' become ",
// punctuation attached to its neighbour. `where` names the file for errors.
std::string brown_detokenize(const std::string& tagged, const std::string& where);

// Reads every document of cfg.corpus ("brown" or "text:PATH"; "instruct" is made by generate_instruct,
// data/instruct.h), sorted by id. Throws FileError naming a missing or unreadable path
// (with a hint to run scripts/install-deps.sh for Brown).
std::vector<Document> load_corpus(const DataConfig& cfg);

struct CorpusSplit {
  std::vector<Document> train, validation, heldout;
  std::vector<std::string> domains;  // sorted names of all domains (held-out ones too); domain id = index
  // Texts the tokenizer trains on besides `train` (instruct: the Brown corpus, docs/instruct-data.md);
  // empty for the other corpora.
  std::vector<std::string> tokenizer_extra;
};

// Puts documents of held-out genres in `heldout`, then a seeded cfg.validation_fraction of each remaining
// domain's documents in `validation`, the rest in `train`. The result depends only on the documents' ids
// and domains and on cfg, not on the order of `docs` nor on the platform's standard library.
// An unknown held-out genre -> ConfigError("data.heldout_genres", ...).
CorpusSplit split_corpus(std::vector<Document> docs, const DataConfig& cfg);

// Index of `domain` in `domains`, or -1.
int64_t domain_id(const std::vector<std::string>& domains, const std::string& domain);

}  // namespace moeforge
