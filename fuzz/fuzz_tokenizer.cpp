// libFuzzer target: the tokenizer model loader (a SentencePiece model proto, as a checkpoint's
// tokenizer.model holds) and encode/decode with the loaded model (docs/reliability.md).
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "moeforge/data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto tok = moeforge::Tokenizer::from_serialized(std::string(reinterpret_cast<const char*>(data), size));
    auto ids = tok.encode("The jury said \xff\xfe caf\xc3\xa9 \xe7\x8c\xab");
    (void)tok.decode(ids);
  } catch (const std::exception&) {
  }
  return 0;
}
