// Process runtime checks: our own objects must run at::parallel_for on more than one thread (they did
// not while the library was compiled without OpenMP, and every kernel glue loop silently ran serially).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <thread>

#include "moeforge/util/runtime.h"

namespace moeforge {
namespace {

TEST(Runtime, ParallelForInTheLibraryUsesSeveralThreads) {
  if (std::thread::hardware_concurrency() < 2) GTEST_SKIP() << "one core: nothing to split";
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  EXPECT_EQ(parallel_for_threads(), 2);
  at::set_num_threads(1);
  EXPECT_EQ(parallel_for_threads(), 1);
  at::set_num_threads(before);
}

}  // namespace
}  // namespace moeforge
