#include "moeforge/interop/spm_proto.h"

#include <cstring>

#include "moeforge/util/error.h"

namespace moeforge {
namespace {

// A protobuf wire-format reader over one message's bytes.
struct Wire {
  const std::string& b;
  size_t pos, end;
  const std::string& where;

  [[noreturn]] void fail(const std::string& what) const {
    throw FileError(where, "not a SentencePiece model: " + what + " at byte " + std::to_string(pos));
  }
  bool done() const { return pos >= end; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos >= end) fail("truncated varint");
      const auto c = static_cast<uint8_t>(b[pos++]);
      v |= uint64_t(c & 0x7f) << shift;
      if (!(c & 0x80)) return v;
    }
    fail("varint longer than 10 bytes");
  }
  // Length-delimited field: [start, start + len).
  std::pair<size_t, size_t> bytes() {
    const uint64_t len = varint();
    if (len > end - pos) fail("field runs past the end");
    const size_t s = pos;
    pos += size_t(len);
    return {s, s + size_t(len)};
  }
  float fixed32f() {
    if (end - pos < 4) fail("truncated float");
    float f;
    std::memcpy(&f, b.data() + pos, 4);
    pos += 4;
    return f;
  }
  void skip(uint32_t wire_type) {
    switch (wire_type) {
      case 0:
        varint();
        break;
      case 1:
        if (end - pos < 8) fail("truncated fixed64");
        pos += 8;
        break;
      case 2:
        bytes();
        break;
      case 5:
        if (end - pos < 4) fail("truncated fixed32");
        pos += 4;
        break;
      default:
        fail("unsupported wire type " + std::to_string(wire_type));
    }
  }
};

}  // namespace

SpmModelInfo parse_spm_model(const std::string& proto, const std::string& where) {
  SpmModelInfo info;
  Wire top{proto, 0, proto.size(), where};
  while (!top.done()) {
    const uint64_t key = top.varint();
    const auto field = uint32_t(key >> 3), wt = uint32_t(key & 7);
    if (field == 1 && wt == 2) {  // repeated SentencePiece pieces
      auto [s, e] = top.bytes();
      Wire m{proto, s, e, where};
      SpmPiece p;
      while (!m.done()) {
        const uint64_t k = m.varint();
        const auto f = uint32_t(k >> 3), w = uint32_t(k & 7);
        if (f == 1 && w == 2) {
          auto [ps, pe] = m.bytes();
          p.piece = proto.substr(ps, pe - ps);
        } else if (f == 2 && w == 5) {
          p.score = m.fixed32f();
        } else if (f == 3 && w == 0) {
          p.type = int32_t(m.varint());
        } else {
          m.skip(w);
        }
      }
      info.pieces.push_back(std::move(p));
    } else if ((field == 2 || field == 3) && wt == 2) {  // trainer_spec, normalizer_spec
      auto [s, e] = top.bytes();
      Wire m{proto, s, e, where};
      while (!m.done()) {
        const uint64_t k = m.varint();
        const auto f = uint32_t(k >> 3), w = uint32_t(k & 7);
        if (w != 0) {
          m.skip(w);
          continue;
        }
        const uint64_t v = m.varint();
        if (field == 2) {
          if (f == 3) info.model_type = int32_t(v);
          if (f == 35) info.byte_fallback = v != 0;
          if (f == 40) info.unk_id = int64_t(int32_t(v));
          if (f == 41) info.bos_id = int64_t(int32_t(v));
          if (f == 42) info.eos_id = int64_t(int32_t(v));
          if (f == 43) info.pad_id = int64_t(int32_t(v));
        } else {
          if (f == 3) info.add_dummy_prefix = v != 0;
          if (f == 4) info.remove_extra_whitespaces = v != 0;
        }
      }
    } else {
      top.skip(wt);
    }
  }
  if (info.pieces.empty()) throw FileError(where, "not a SentencePiece model: no pieces");
  return info;
}

}  // namespace moeforge
