// libFuzzer target: the safetensors reader (docs/reliability.md). Any input must parse or throw
// std::runtime_error; a crash, sanitizer report, leak or hang is a finding.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "moeforge/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto st = moeforge::parse_safetensors(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
    // Touch what a caller would: every tensor's bytes.
    for (auto& t : st.tensors)
      if (t.second.numel() > 0) (void)t.second.sum();
  } catch (const std::runtime_error&) {
  }
  return 0;
}
