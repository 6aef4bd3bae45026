// Built for three instruction sets and picked at load time, like small_mm.cpp: AVX512-BF16 (vdpbf16ps:
// 32 bf16 products a instruction, summed in float32), AVX2 (bf16 widened to float32, which is exact, and
// fused multiply-adds) and a plain loop. The products of two bf16 values are exact in float32 in every
// build; the builds differ in the order of the float32 sums only (and vdpbf16ps flushes subnormals).
#include "small_mm_bf16.h"

#include <algorithm>
#include <cstring>
#include <string_view>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace moeforge::kernels::cpu {
namespace {

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Weight rows per block: a block's rows (8 x n_in x 2 bytes, 8-22 KiB at the widths we run) stay in L1/L2
// while every group of up to 4 input rows passes over them, so the weight comes from memory once.
constexpr int64_t kRowBlock = 8;

// Every ISA's kernel K supplies rows<RB>(out, ld_out, in, w, n_in): RB input rows (1-4) times one weight
// row, out[r * ld_out] for r < RB.
template <class K>
void drive(float* out, int64_t ld_out, const uint16_t* in, const uint16_t* w, int64_t n, int64_t n_out,
           int64_t n_in) {
  for (int64_t o0 = 0; o0 < n_out; o0 += kRowBlock) {
    const int64_t o1 = std::min(o0 + kRowBlock, n_out);
    for (int64_t r = 0; r < n; r += 4) {
      const int64_t rb = std::min<int64_t>(4, n - r);
      float* po = out + r * ld_out;
      const uint16_t* pi = in + r * n_in;
      for (int64_t o = o0; o < o1; ++o) {
        const uint16_t* pw = w + o * n_in;
        switch (rb) {
          case 4:
            K::template rows<4>(po + o, ld_out, pi, pw, n_in);
            break;
          case 3:
            K::template rows<3>(po + o, ld_out, pi, pw, n_in);
            break;
          case 2:
            K::template rows<2>(po + o, ld_out, pi, pw, n_in);
            break;
          default:
            K::template rows<1>(po + o, ld_out, pi, pw, n_in);
        }
      }
    }
  }
}

struct Generic {
  template <int RB>
  static void rows(float* out, int64_t ld_out, const uint16_t* in, const uint16_t* w, int64_t n_in) {
    for (int r = 0; r < RB; ++r) {
      float acc = 0;
      for (int64_t i = 0; i < n_in; ++i) acc += bf16_to_float(in[r * n_in + i]) * bf16_to_float(w[i]);
      out[r * ld_out] = acc;
    }
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define MOEFORGE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define MOEFORGE_AVX2_TARGET __attribute__((target("avx2,fma")))

// vdpbf16ps: acc[j] += a[2j] b[2j] + a[2j+1] b[2j+1] over 32 bf16 lanes; in and w run along the same
// index, so the lanes' sum is the dot product. Two accumulators per row along the width (64 values a
// pass), a masked load for the last n_in % 32.
struct Avx512Bf16 {
  template <int RB>
  MOEFORGE_BF16_TARGET static void rows(float* out, int64_t ld_out, const uint16_t* in, const uint16_t* w,
                                        int64_t n_in) {
    __m512 acc[RB][2];
    for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n_in; i += 64) {
      const __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 32);
      for (int r = 0; r < RB; ++r) {
        const uint16_t* x = in + r * n_in + i;
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_loadu_si512(x), (__m512bh)w0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)_mm512_loadu_si512(x + 32), (__m512bh)w1);
      }
    }
    if (i < n_in) {
      // The rest, 1-63 values, in one or two masked loads (the masked-off lanes read as zero).
      for (int half = 0; half < 2 && i < n_in; ++half, i += 32) {
        const int64_t left = std::min<int64_t>(32, n_in - i);
        const __mmask32 m = static_cast<__mmask32>(left == 32 ? ~0ull : (1ull << left) - 1);
        const __m512i wv = _mm512_maskz_loadu_epi16(m, w + i);
        for (int r = 0; r < RB; ++r)
          acc[r][half] = _mm512_dpbf16_ps(
              acc[r][half], (__m512bh)_mm512_maskz_loadu_epi16(m, in + r * n_in + i), (__m512bh)wv);
      }
    }
    // The lanes summed through memory: GCC 12's _mm512_reduce_add_ps warns of its own undefined vector.
    for (int r = 0; r < RB; ++r) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, _mm512_add_ps(acc[r][0], acc[r][1]));
      float s = 0;
      for (float l : lanes) s += l;
      out[r * ld_out] = s;
    }
  }
};

MOEFORGE_AVX2_TARGET inline __m256 widen8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// bf16 widened to float32 (a 16-bit shift: exact) and fused multiply-adds, 8 lanes, two accumulators a row.
struct Avx2 {
  template <int RB>
  MOEFORGE_AVX2_TARGET static void rows(float* out, int64_t ld_out, const uint16_t* in, const uint16_t* w,
                                        int64_t n_in) {
    __m256 acc[RB][2];
    for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n_in; i += 16) {
      const __m256 w0 = widen8(w + i), w1 = widen8(w + i + 8);
      for (int r = 0; r < RB; ++r) {
        const uint16_t* x = in + r * n_in + i;
        acc[r][0] = _mm256_fmadd_ps(widen8(x), w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(widen8(x + 8), w1, acc[r][1]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, _mm256_add_ps(acc[r][0], acc[r][1]));
      float s = 0;
      for (float l : lanes) s += l;
      for (int64_t j = i; j < n_in; ++j) s += bf16_to_float(in[r * n_in + j]) * bf16_to_float(w[j]);
      out[r * ld_out] = s;
    }
  }
};

MOEFORGE_BF16_TARGET void small_mm_bf16_avx512bf16(float* out, int64_t ld_out, const uint16_t* in,
                                                   const uint16_t* w, int64_t n, int64_t n_out,
                                                   int64_t n_in) {
  drive<Avx512Bf16>(out, ld_out, in, w, n, n_out, n_in);
}
MOEFORGE_AVX2_TARGET void small_mm_bf16_avx2(float* out, int64_t ld_out, const uint16_t* in,
                                             const uint16_t* w, int64_t n, int64_t n_out, int64_t n_in) {
  drive<Avx2>(out, ld_out, in, w, n, n_out, n_in);
}
#endif

void small_mm_bf16_generic(float* out, int64_t ld_out, const uint16_t* in, const uint16_t* w, int64_t n,
                           int64_t n_out, int64_t n_in) {
  drive<Generic>(out, ld_out, in, w, n, n_out, n_in);
}

using SmallMMBf16 = void (*)(float*, int64_t, const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t);

SmallMMBf16 small_mm_bf16_for(std::string_view isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512bf16" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
    return small_mm_bf16_avx512bf16;
  if (isa == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return small_mm_bf16_avx2;
#endif
  if (isa == "generic") return small_mm_bf16_generic;
  return nullptr;
}

struct Picked {
  SmallMMBf16 f = small_mm_bf16_generic;
  std::string_view isa = "generic";
};

const Picked& picked() {
  static const Picked p = [] {
    Picked out;
    for (std::string_view isa : {"avx512bf16", "avx2"})
      if (auto f = small_mm_bf16_for(isa)) {
        out.f = f;
        out.isa = isa;
        break;
      }
    return out;
  }();
  return p;
}

}  // namespace

void small_mm_nt_bf16(float* out, int64_t ld_out, const uint16_t* in, const uint16_t* w, int64_t n,
                      int64_t n_out, int64_t n_in) {
  picked().f(out, ld_out, in, w, n, n_out, n_in);
}

bool small_mm_nt_bf16_isa(std::string_view isa, float* out, int64_t ld_out, const uint16_t* in,
                          const uint16_t* w, int64_t n, int64_t n_out, int64_t n_in) {
  const SmallMMBf16 f = small_mm_bf16_for(isa);
  if (f) f(out, ld_out, in, w, n, n_out, n_in);
  return f != nullptr;
}

std::string_view small_mm_nt_bf16_picked() {
  return picked().isa;
}

}  // namespace moeforge::kernels::cpu
