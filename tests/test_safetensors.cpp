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

}  // namespace
}  // namespace moeforge
