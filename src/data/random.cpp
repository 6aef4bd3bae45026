#include "moeforge/data/random.h"

#include <numeric>
#include <random>
#include <stdexcept>
#include <utility>

namespace moeforge {

namespace {
template <class T>
std::vector<T> fisher_yates(int64_t n, uint64_t seed) {
  std::vector<T> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), T{0});
  std::mt19937_64 rng(seed);
  // The modulo bias is below n / 2^64: irrelevant for shuffling, and it keeps the draw platform-independent.
  for (int64_t i = n - 1; i > 0; --i)
    std::swap(perm[size_t(i)], perm[size_t(rng() % static_cast<uint64_t>(i + 1))]);
  return perm;
}
}  // namespace

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  return fisher_yates<int64_t>(n, seed);
}

std::vector<uint32_t> seeded_permutation32(int64_t n, uint64_t seed) {
  if (n > int64_t(UINT32_MAX) + 1) throw std::invalid_argument("seeded_permutation32: n >= 2^32");
  return fisher_yates<uint32_t>(n, seed);
}

uint64_t fnv1a64(const std::string& bytes, uint64_t h) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace moeforge
