#include "moeforge/data/random.h"

#include <numeric>
#include <random>
#include <utility>

namespace moeforge {

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::mt19937_64 rng(seed);
  // The modulo bias is below n / 2^64: irrelevant for shuffling, and it keeps the draw platform-independent.
  for (int64_t i = n - 1; i > 0; --i) std::swap(perm[i], perm[rng() % static_cast<uint64_t>(i + 1)]);
  return perm;
}

uint64_t fnv1a64(const std::string& bytes, uint64_t h) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace moeforge
