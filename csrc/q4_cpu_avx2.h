// q4_cpu_avx2.h: AVX2 forms of two CPU inner loops (x86-64 with -march=native only).
//
// They compute exactly what the portable loops in q4_cpu.cpp compute with q4_element.h, and the
// parity tests (tests/test_kernels.py, bench/sweep_parity.py) run them on every AVX2 machine:
// - encode_pack32_avx2: steps 4-6 of reference/blockwise.py for 32 values. xn = RN(RN(x*s)*r) with
//   two _mm256_mul_ps (no FMA), then #{k : t_k < xn} by a 4-level binary search over the 15 sorted
//   thresholds (padded with +Inf): for sorted t, the search with `xn > t` at each node returns the
//   same count as q4_count_below's 15 compares, in 4 compares. Codes are packed high nibble first.
// - lookup16_avx2 / lookup32_avx2: the dequantize table lookup out[i] = level[code_i] (level =
//   q4_decode results for one block, already rounded to the output dtype) with byte shuffles: a
//   pure copy of table entries, no arithmetic.
#pragma once
#if defined(__AVX2__)
#include <immintrin.h>
#include "q4_element.h"

namespace q4lab {

// The binary-search tree of 15 sorted thresholds: node tables for steps 8, 4, 2, 1.
static_assert(Q4_MAX_THRESHOLDS == 15, "the AVX2 search tree has 4 levels: 15 thresholds");
struct Q4TreeAvx2 {
  __m256 t8, t4, t2, t1;
  explicit Q4TreeAvx2(const float* t) {
    t8 = _mm256_set1_ps(t[7]);
    t4 = _mm256_setr_ps(t[3], t[11], 0, 0, 0, 0, 0, 0);
    t2 = _mm256_setr_ps(t[1], t[5], t[9], t[13], 0, 0, 0, 0);
    t1 = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);
  }
};

inline __m256i q4_count_below_avx2(const Q4TreeAvx2& tree, __m256 xn) {
  const auto above = [&](__m256 t, int step) {
    return _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(xn, t, _CMP_GT_OQ)),
                            _mm256_set1_epi32(step));
  };
  __m256i c = above(tree.t8, 8);
  c = _mm256_add_epi32(c, above(_mm256_permutevar8x32_ps(tree.t4, _mm256_srli_epi32(c, 3)), 4));
  c = _mm256_add_epi32(c, above(_mm256_permutevar8x32_ps(tree.t2, _mm256_srli_epi32(c, 2)), 2));
  c = _mm256_add_epi32(c, above(_mm256_permutevar8x32_ps(tree.t1, _mm256_srli_epi32(c, 1)), 1));
  return c;
}

// 32 float32 inputs -> 16 packed bytes (element 2j in the high nibble).
inline void encode_pack32_avx2(const float* v, Q4Scale s, const Q4TreeAvx2& tree, uint8_t* out) {
  const __m256 pre = _mm256_set1_ps(s.prescale), rec = _mm256_set1_ps(s.recip);
  __m256i c[4];
  for (int q = 0; q < 4; ++q) {
    const __m256 xn = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * q), pre), rec);
    c[q] = q4_count_below_avx2(tree, xn);
  }
  // 32-bit counts -> bytes in element order (packus works per 128-bit lane; permute fixes it)
  __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // 16-bit pairs (low byte = element 2j): (even << 4) | odd
  const __m256i w = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0xff)), 4),
                                    _mm256_srli_epi16(b, 8));
  const __m128i packed = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
}

// 16 packed bytes -> 32 nibble indices in element order (two registers of 16).
inline void unpack16(const uint8_t* p, __m128i* first, __m128i* second) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i even = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask), odd = _mm_and_si128(bytes, mask);
  *first = _mm_unpacklo_epi8(even, odd);
  *second = _mm_unpackhi_epi8(even, odd);
}

// 16-bit outputs (fp16/bf16 bit patterns): 16 packed bytes -> 32 values.
inline void lookup16_avx2(const uint16_t* level, const uint8_t* p, uint16_t* o) {
  alignas(16) uint8_t lo[16], hi[16];
  for (int c = 0; c < 16; ++c) { lo[c] = (uint8_t)level[c]; hi[c] = (uint8_t)(level[c] >> 8); }
  const __m128i tlo = _mm_load_si128(reinterpret_cast<const __m128i*>(lo));
  const __m128i thi = _mm_load_si128(reinterpret_cast<const __m128i*>(hi));
  __m128i idx[2];
  unpack16(p, &idx[0], &idx[1]);
  for (int h = 0; h < 2; ++h) {
    const __m128i l = _mm_shuffle_epi8(tlo, idx[h]), u = _mm_shuffle_epi8(thi, idx[h]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16 * h), _mm_unpacklo_epi8(l, u));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16 * h + 8), _mm_unpackhi_epi8(l, u));
  }
}

// float32 outputs: 16 packed bytes -> 32 values, two 8-entry permutes and a blend on bit 3.
inline void lookup32_avx2(const float* level, const uint8_t* p, float* o) {
  const __m256 low = _mm256_loadu_ps(level), high = _mm256_loadu_ps(level + 8);
  __m128i idx[2];
  unpack16(p, &idx[0], &idx[1]);
  for (int h = 0; h < 2; ++h) {
    for (int q = 0; q < 2; ++q) {
      const __m256i i = _mm256_cvtepu8_epi32(q ? _mm_srli_si128(idx[h], 8) : idx[h]);
      const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(i, 28));  // bit 3 -> sign bit
      const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, i),
                                        _mm256_permutevar8x32_ps(high, i), pick);
      _mm256_storeu_ps(o + 16 * h + 8 * q, v);
    }
  }
}

}  // namespace q4lab
#endif  // __AVX2__
