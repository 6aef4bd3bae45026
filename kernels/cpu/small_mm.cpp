// Compiled with -ffast-math (CMakeLists.txt) so that the double kernel's dot products vectorise
// (reassociated sums); the float kernel spells its vectors out with GCC/Clang vector extensions.
#include "small_mm.h"

#include <string_view>

#include "simd.h"

namespace moeforge::kernels::cpu {
namespace {

#define MOEFORGE_INLINE inline __attribute__((always_inline))

// W float lanes. Loaded by dereferencing a pointer to this type: aligned as float (any float address)
// and may_alias (it reads float arrays). Not through memcpy into arrays of vectors: the AVX2 build then
// kept the vectors on the stack and ran 3-5x slower.
template <int W>
struct Lanes {
  typedef float type __attribute__((vector_size(W * sizeof(float)), aligned(alignof(float)), may_alias));
};
#define MOEFORGE_LOAD(V, p) (*reinterpret_cast<const V*>(p))

// Dot products of RB input rows with one weight row, U independent accumulators per input row along
// the input width: with one or two rows a single accumulator would wait on the FMA latency instead of
// the memory (decode reads each weight row once, straight from DRAM or L3).
template <int W, int RB, int U>
MOEFORGE_INLINE void rows_times_one(float* out, int64_t ld_out, const float* in, const float* w,
                                    int64_t n_in) {
  using V = typename Lanes<W>::type;
  V acc[RB][U];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = V{};
  int64_t i = 0;
  for (; i + W * U <= n_in; i += W * U)
    for (int u = 0; u < U; ++u) {
      const V wv = MOEFORGE_LOAD(V, w + i + u * W);
      for (int r = 0; r < RB; ++r) acc[r][u] += MOEFORGE_LOAD(V, in + r * n_in + i + u * W) * wv;
    }
  for (int r = 0; r < RB; ++r) {
    V t = acc[r][0];
    for (int u = 1; u < U; ++u) t += acc[r][u];
    float s = 0;
    for (int l = 0; l < W; ++l) s += t[l];
    for (int64_t j = i; j < n_in; ++j) s += in[r * n_in + j] * w[j];
    out[r * ld_out] = s;
  }
}

// RB input rows times OB weight rows: RB * OB accumulators, each loaded vector used OB or RB times, for
// groups of 8 rows and more, where one weight row per pass would be bound by the loads of the inputs.
template <int W, int RB, int OB>
MOEFORGE_INLINE void tile(float* out, int64_t ld_out, const float* in, const float* w, int64_t n_in) {
  using V = typename Lanes<W>::type;
  V acc[RB][OB];
  for (int r = 0; r < RB; ++r)
    for (int o = 0; o < OB; ++o) acc[r][o] = V{};
  int64_t i = 0;
  for (; i + W <= n_in; i += W) {
    V xv[RB];
    for (int r = 0; r < RB; ++r) xv[r] = MOEFORGE_LOAD(V, in + r * n_in + i);
    for (int o = 0; o < OB; ++o) {
      const V wv = MOEFORGE_LOAD(V, w + o * n_in + i);
      for (int r = 0; r < RB; ++r) acc[r][o] += xv[r] * wv;
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int o = 0; o < OB; ++o) {
      float s = 0;
      for (int l = 0; l < W; ++l) s += acc[r][o][l];
      for (int64_t j = i; j < n_in; ++j) s += in[r * n_in + j] * w[o * n_in + j];
      out[r * ld_out + o] = s;
    }
}

// Every weight row once against RB input rows.
template <int W, int RB, int U>
MOEFORGE_INLINE void stream_rows(float* out, int64_t ld_out, const float* in, const float* w, int64_t n_out,
                                 int64_t n_in) {
  for (int64_t o = 0; o < n_out; ++o) rows_times_one<W, RB, U>(out + o, ld_out, in, w + o * n_in, n_in);
}

// RB input rows against all weight rows in tiles of OB, the last n_out % OB rows one at a time.
template <int W, int RB, int OB>
MOEFORGE_INLINE void tile_rows(float* out, int64_t ld_out, const float* in, const float* w, int64_t n_out,
                               int64_t n_in) {
  int64_t o = 0;
  for (; o + OB <= n_out; o += OB) tile<W, RB, OB>(out + o, ld_out, in, w + o * n_in, n_in);
  for (; o < n_out; ++o) rows_times_one<W, RB, 1>(out + o, ld_out, in, w + o * n_in, n_in);
}

// The last n % RB rows of a tiled group (RB - 1 down to 1).
template <int W, int RB, int OB>
MOEFORGE_INLINE void tile_tail(float* out, int64_t ld_out, const float* in, const float* w, int64_t n_out,
                               int64_t n_in, int64_t left) {
  if constexpr (RB > 1) {
    if (left == RB - 1) return tile_rows<W, RB - 1, OB>(out, ld_out, in, w, n_out, n_in);
    tile_tail<W, RB - 1, OB>(out, ld_out, in, w, n_out, n_in, left);
  }
}

// Fewer than 8 rows stream each weight row once for all of them (memory-bound: 1-7 rows are 2-14 flops
// per weight read) with WS lanes; 8 rows and more go in RB x OB tiles of WT lanes. Measured on the bench
// machine (AMD EPYC with AVX-512, 2 threads, C = 512, 64-output tasks, 96 MiB of weights from DRAM):
// streaming with 8 lanes reads 40-48 GB/s for 1-3 rows (the machine's bandwidth), ~36 for 4, ~30 for 6,
// ~23 for 7, where 16 lanes gave 25-31 for 2-3 rows and 17-28 for 4-7; tiles of 16 lanes, 4 x 6, 14-23
// GB/s at 8-12 rows (8 lanes ~19, one weight row per pass ~16).
template <int WS, int WT, int RB, int OB>
MOEFORGE_INLINE void small_mm_float(float* out, int64_t ld_out, const float* in, const float* w, int64_t n,
                                    int64_t n_out, int64_t n_in) {
  switch (n) {
    case 0:
      return;
    case 1:
      return stream_rows<WS, 1, 4>(out, ld_out, in, w, n_out, n_in);
    case 2:
      return stream_rows<WS, 2, 2>(out, ld_out, in, w, n_out, n_in);
    case 3:
      return stream_rows<WS, 3, 2>(out, ld_out, in, w, n_out, n_in);
    case 4:
      return stream_rows<WS, 4, 1>(out, ld_out, in, w, n_out, n_in);
    case 5:
      return stream_rows<WS, 5, 1>(out, ld_out, in, w, n_out, n_in);
    case 6:
      return stream_rows<WS, 6, 1>(out, ld_out, in, w, n_out, n_in);
    case 7:
      return stream_rows<WS, 7, 1>(out, ld_out, in, w, n_out, n_in);
    default:
      break;
  }
  int64_t r = 0;
  for (; r + RB <= n; r += RB) tile_rows<WT, RB, OB>(out + r * ld_out, ld_out, in + r * n_in, w, n_out, n_in);
  if (r < n) tile_tail<WT, RB, OB>(out + r * ld_out, ld_out, in + r * n_in, w, n_out, n_in, n - r);
}

using SmallMMFloat = void (*)(float*, int64_t, const float*, const float*, int64_t, int64_t, int64_t);

void small_mm_float_generic(float* out, int64_t ld_out, const float* in, const float* w, int64_t n,
                            int64_t n_out, int64_t n_in) {
  small_mm_float<4, 4, 2, 4>(out, ld_out, in, w, n, n_out, n_in);
}

#if defined(__x86_64__) && defined(__GNUC__)
// Register budgets: AVX-512 has 32 vector registers (4 x 6 accumulators + 4 inputs + 1 weight), AVX2 16
// (3 x 4 + 3 + 1).
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void small_mm_float_avx512(
    float* out, int64_t ld_out, const float* in, const float* w, int64_t n, int64_t n_out, int64_t n_in) {
  small_mm_float<8, 16, 4, 6>(out, ld_out, in, w, n, n_out, n_in);
}
__attribute__((target("avx2,fma"))) void small_mm_float_avx2(float* out, int64_t ld_out, const float* in,
                                                             const float* w, int64_t n, int64_t n_out,
                                                             int64_t n_in) {
  small_mm_float<8, 8, 3, 4>(out, ld_out, in, w, n, n_out, n_in);
}
#endif

// The build of the float kernel for an instruction set, or null when this CPU or build lacks it.
SmallMMFloat small_mm_float_for(std::string_view isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return small_mm_float_avx512;
  if (isa == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return small_mm_float_avx2;
#endif
  if (isa == "generic") return small_mm_float_generic;
  return nullptr;
}

// Picked once: the widest the CPU running the binary supports.
SmallMMFloat pick_small_mm_float() {
  for (const char* isa : {"avx512", "avx2"})
    if (auto f = small_mm_float_for(isa)) return f;
  return small_mm_float_generic;
}

template <typename T>
inline void small_mm_plain(T* out, int64_t ld_out, const T* in, const T* w, int64_t n, int64_t n_out,
                           int64_t n_in) {
  for (int64_t o = 0; o < n_out; ++o) {
    const T* wo = w + o * n_in;  // stays in L1 across the n rows
    for (int64_t r = 0; r < n; ++r) {
      const T* x = in + r * n_in;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n_in; ++i) acc += x[i] * wo[i];
      out[r * ld_out + o] = acc;
    }
  }
}

}  // namespace

void small_mm_nt(float* out, int64_t ld_out, const float* in, const float* w, int64_t n, int64_t n_out,
                 int64_t n_in) {
  static const SmallMMFloat impl = pick_small_mm_float();
  impl(out, ld_out, in, w, n, n_out, n_in);
}

bool small_mm_nt_isa(std::string_view isa, float* out, int64_t ld_out, const float* in, const float* w,
                     int64_t n, int64_t n_out, int64_t n_in) {
  const SmallMMFloat f = small_mm_float_for(isa);
  if (f) f(out, ld_out, in, w, n, n_out, n_in);
  return f != nullptr;
}

MOEFORGE_KERNEL_CLONES
void small_mm_nt(double* out, int64_t ld_out, const double* in, const double* w, int64_t n, int64_t n_out,
                 int64_t n_in) {
  small_mm_plain(out, ld_out, in, w, n, n_out, n_in);
}

}  // namespace moeforge::kernels::cpu
