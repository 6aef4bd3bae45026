// safetensors round trip and clear errors for truncated or corrupted files.
#include <fstream>

#include "moeforge/io/safetensors.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

std::string tmp_path(const std::string& name) {
  return ::testing::TempDir() + "/" + name;
}

TEST(SafeTensors, RoundTripKeepsNamesShapesDtypesAndMetadata) {
  std::vector<std::pair<std::string, torch::Tensor>> t = {{"a", torch::randn({3, 4})},
                                                          {"b", torch::arange(5, torch::kLong)},
                                                          {"c", torch::randn({2}, torch::kDouble)},
                                                          {"d", torch::tensor({true, false})},
                                                          {"e", torch::randn({2, 2}).to(torch::kBFloat16)}};
  const auto path = tmp_path("rt.safetensors");
  write_safetensors(path, t, {{"step", "12"}});
  auto back = read_safetensors(path);
  ASSERT_EQ(back.tensors.size(), t.size());
  for (size_t i = 0; i < t.size(); ++i) {
    EXPECT_EQ(back.tensors[i].first, t[i].first);
    EXPECT_TRUE(torch::equal(back.tensors[i].second, t[i].second)) << t[i].first;
  }
  EXPECT_EQ(back.metadata.at("step"), "12");
}

TEST(SafeTensors, TruncatedFileNamesTheProblem) {
  const auto path = tmp_path("trunc.safetensors");
  write_safetensors(path, {{"w", torch::randn({64, 64})}});
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  for (size_t keep : {size_t(4), size_t(20), bytes.size() - 100}) {
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), std::streamsize(keep));
    }
    try {
      read_safetensors(path);
      ADD_FAILURE() << "no error at " << keep << " bytes";
    } catch (const FileError& e) {
      EXPECT_EQ(e.path(), path);
      EXPECT_NE(std::string(e.what()).find("trunc"), std::string::npos) << e.what();
    }
  }
}

TEST(SafeTensors, GarbageHeaderIsAClearError) {
  const auto path = tmp_path("garbage.safetensors");
  {
    std::ofstream out(path, std::ios::binary);
    const uint64_t len = 10;
    out.write(reinterpret_cast<const char*>(&len), 8);
    out << "not json!!";
  }
  EXPECT_THROW(read_safetensors(path), FileError);
  EXPECT_THROW(read_safetensors(tmp_path("missing.safetensors")), FileError);
}

// A hand-made file: the 8-byte little-endian length of `header`, `header`, then `data_bytes` zero bytes.
std::string hostile_file(const std::string& name, const std::string& header, size_t data_bytes,
                         uint64_t claimed_len = 0) {
  const auto path = tmp_path(name);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const uint64_t len = claimed_len ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) out.put(char((len >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\0');
  return path;
}

// Expects read_safetensors(path) to throw FileError naming `path` and containing every one of `words`.
void expect_rejected(const std::string& path, const std::vector<std::string>& words) {
  try {
    read_safetensors(path);
    ADD_FAILURE() << "no error for " << path;
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), path);
    for (auto& w : words) EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
  }
}

TEST(SafeTensorsHostile, HugeShapeIsRejectedBeforeAllocating) {
  // [262144, 262144] F32 is 256 GiB: the byte count disagrees with the 16 data bytes, and nothing is
  // allocated (an allocation would abort the test with bad_alloc or take the machine's memory).
  expect_rejected(hostile_file("huge.safetensors",
                               R"({"w":{"dtype":"F32","shape":[262144,262144],"data_offsets":[0,16]}})", 16),
                  {"tensor 'w'", "274877906944 bytes expected"});
  // The offsets agree with the shape but run past the file.
  expect_rejected(
      hostile_file("huge2.safetensors",
                   R"({"w":{"dtype":"F32","shape":[262144,262144],"data_offsets":[0,274877906944]}})", 16),
      {"tensor 'w'", "outside the 16 data bytes"});
}

TEST(SafeTensorsHostile, OverflowingShapeIsAClearError) {
  for (const char* shape : {"[4294967296,4294967296]", "[3037000500,3037000500]", "[2,4611686018427387904]",
                            "[9223372036854775807,2]"})
    expect_rejected(
        hostile_file("overflow.safetensors",
                     std::string(R"({"w":{"dtype":"F32","shape":)") + shape + R"(,"data_offsets":[0,0]}})",
                     0),
        {"tensor 'w'", "overflows"});
  expect_rejected(
      hostile_file("toobig.safetensors",
                   R"({"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]}})", 0),
      {"tensor 'w'", "too large"});
  expect_rejected(
      hostile_file("negative.safetensors", R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", 0),
      {"tensor 'w'", "negative"});
  expect_rejected(
      hostile_file("float.safetensors", R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", 1),
      {"tensor 'w'", "not an integer"});
  expect_rejected(
      hostile_file("negoff.safetensors", R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", 1),
      {"tensor 'w'", "negative"});
}

TEST(SafeTensorsHostile, TruncatedDataAndLongHeaderAreNamed) {
  expect_rejected(
      hostile_file("short.safetensors", R"({"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}})", 10),
      {"tensor 'w'", "truncated"});
  // A header length beyond the file, and one beyond the 100 MB limit.
  expect_rejected(hostile_file("longhdr.safetensors", "{}", 0, 1000), {"runs past the end"});
  expect_rejected(hostile_file("maxhdr.safetensors", "{}", 0, uint64_t(-1)), {"runs past the end"});
}

TEST(SafeTensorsHostile, GarbageJsonAndWrongTypesAreNamed) {
  expect_rejected(hostile_file("g1.safetensors", "{\"w\": [1, 2", 0), {"not valid JSON"});
  expect_rejected(hostile_file("g2.safetensors", "[1,2,3]", 0), {"not a JSON object"});
  expect_rejected(hostile_file("g3.safetensors", R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,1]}})", 1),
                  {"tensor 'w'", "dtype"});
  expect_rejected(
      hostile_file("g4.safetensors", R"({"w":{"dtype":"F32","shape":3,"data_offsets":[0,4]}})", 4),
      {"tensor 'w'", "shape"});
  expect_rejected(
      hostile_file("g5.safetensors", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":{"a":1}}})", 4),
      {"tensor 'w'", "data_offsets"});
  expect_rejected(
      hostile_file("g6.safetensors", R"({"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", 1),
      {"tensor 'w'", "unsupported dtype"});
  expect_rejected(hostile_file("g7.safetensors", R"({"__metadata__":[1]})", 0), {"__metadata__"});
  expect_rejected(hostile_file("g8.safetensors", R"({"w":5})", 0), {"tensor 'w'"});
}

TEST(SafeTensorsHostile, OverlapsHolesAndTrailingBytesAreRejected) {
  expect_rejected(hostile_file("overlap.safetensors",
                               R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                               R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                               6),
                  {"overlap", "'b'", "'a'"});
  expect_rejected(hostile_file("hole.safetensors",
                               R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                               R"("b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
                               6),
                  {"hole", "'b'"});
  expect_rejected(
      hostile_file("trailing.safetensors", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 5),
      {"3 trailing data bytes"});
  // Empty tensors may share an offset; the file is still read.
  auto ok = read_safetensors(hostile_file("empties.safetensors",
                                          R"({"a":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]},)"
                                          R"("b":{"dtype":"F32","shape":[3,0],"data_offsets":[0,0]},)"
                                          R"("c":{"dtype":"U8","shape":[],"data_offsets":[0,1]}})",
                                          1));
  ASSERT_EQ(ok.tensors.size(), 3u);
  EXPECT_EQ(ok.at("b").sizes(), (std::vector<int64_t>{3, 0}));
  EXPECT_EQ(ok.at("c").dim(), 0);
}

}  // namespace
}  // namespace moeforge
