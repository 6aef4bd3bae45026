// Shared by the fuzz targets whose input is a folder (docs/reliability.md): the input's parts, separated
// by the line "--moeforge-fuzz-file--", at most `max_parts` (the last one keeps any further separators).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

inline std::vector<std::string> split_fuzz_parts(const std::string& in, size_t max_parts) {
  std::vector<std::string> parts;
  const std::string sep = "\n--moeforge-fuzz-file--\n";
  for (size_t pos = 0;;) {
    const size_t next = in.find(sep, pos);
    parts.push_back(in.substr(pos, next == std::string::npos ? std::string::npos : next - pos));
    if (next == std::string::npos || parts.size() == max_parts) break;
    pos = next + sep.size();
  }
  return parts;
}
