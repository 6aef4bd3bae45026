// Platform-independent seeded randomness for splits and batch orders. std::shuffle and
// std::uniform_int_distribution may differ between standard libraries; mt19937_64's output is fixed by
// the standard, so a permutation drawn from it directly is the same everywhere.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

// Fisher-Yates permutation of 0..n-1 drawn from mt19937_64(seed).
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);
// The same permutation in 32-bit entries (n < 2^32): half the memory for a large shard split's epoch order.
std::vector<uint32_t> seeded_permutation32(int64_t n, uint64_t seed);

// 64-bit FNV-1a hash, folded into `h` (start from the default offset basis): stable cache keys and seeds.
uint64_t fnv1a64(const std::string& bytes, uint64_t h = 14695981039346656037ull);

}  // namespace moeforge
