// The parts of a serialized SentencePiece ModelProto (sentencepiece_model.proto) that other formats carry:
// the pieces with their scores and types, and the normaliser flags. Read directly from the protobuf wire
// format, so that it needs no SentencePiece library.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

struct SpmPiece {
  std::string piece;
  float score = 0;
  int32_t type = 1;  // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte (as in GGUF)
};

struct SpmModelInfo {
  std::vector<SpmPiece> pieces;  // in id order
  int32_t model_type = 1;        // trainer_spec.model_type: 1 unigram, 2 bpe, 3 word, 4 char
  bool add_dummy_prefix = true;  // normalizer_spec.add_dummy_prefix
  bool remove_extra_whitespaces = true;
  bool byte_fallback = false;                               // trainer_spec.byte_fallback
  int64_t unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;  // trainer_spec ids
};

// Throws FileError(where, ...) when the bytes are not a well-formed ModelProto with pieces.
SpmModelInfo parse_spm_model(const std::string& proto, const std::string& where);

}  // namespace moeforge
