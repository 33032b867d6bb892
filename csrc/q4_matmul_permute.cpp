// q4_matmul_permute.cpp: the `permute` form of torch.ops.q4lab.matmul_4bit on the CPU (AVX-512F):
// 16 output rows per 512-bit register, ONE vpermps looking up the 16 products of one x_k for all 16.
//
// Specification: q4lab/reference/matmul.py, order pair-chain-v2 (docs/format.md, "Fused matmul"):
// per row and block s = +0.0, then s = RN(s + RN(p[2j] + p[2j+1])) over the block's bytes, then
// acc = RN(acc + RN(absmax * s)) block by block from acc = +0.0. Every lane below is one row's
// chain of the spec, so the bytes equal the reference's (and every other form's) on any thread count.
//
// Why this form (issue 21): with AVX-512 the 16 products RN(t[v] * x_k) of one input element fill
// one register (64 bytes), and `vpermps` takes its 16 indices from the low 4 bits of each 32-bit
// lane and ignores the rest. The decode layout's bytes (csrc/q4_matmul_rows.cpp), zero-extended to
// 32 bits (`vpmovzxbd`), are then the odd-k index as they are and the even-k index after one shift:
// per 32 weights (16 rows, one byte column) 1 widen, 1 shift, 2 permutes, 2 adds, no unpacks (the
// AVX2 `rows` form needs 12 shuffles per 32 weights to rebuild floats from byte planes).
//
// The same source builds everywhere: the lanes are GCC vector types (`__builtin_shuffle` is
// vpermps under -mavx512f; elsewhere the compiler lowers it lane by lane, slow but with the same
// IEEE operations), so the tests check this form bit for bit on machines without AVX-512 too.
// 'auto' picks it only where it is native (permute_form_native()).
//
// Lanes hold rows in the layout's position order (row_of_position): the absmax is permuted into
// that order once per block and group, and the sums back into row order once per call (store).
#include <cstring>
#include "q4_matmul_rows.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#else
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors between inline functions of this file
#endif

namespace q4lab {

bool permute_form_native() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

namespace {

typedef float V16f __attribute__((vector_size(64)));
typedef int32_t V16i __attribute__((vector_size(64)));

constexpr int64_t kProductsBytes = 64;  // RN(t[v] * x_k) for v = 0..15, float32

// 16 bytes of codes, zero-extended to 32-bit lanes (vpmovzxbd).
inline V16i widen(const uint8_t* p) {
#if defined(__AVX512F__)
  return (V16i)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  V16i z;
  for (int i = 0; i < 16; ++i) z[i] = p[i];
  return z;
#endif
}

// products[idx mod 16] lane by lane: the low nibble of each lane picks (vpermps).
inline V16f lookup(const V16f& products, V16i idx) { return __builtin_shuffle(products, idx); }

// The positions 16h .. 16h+15 as rows of the group: a two-source shuffle mask for (rows 0-15,
// rows 16-31) of a row-ordered vector of 32.
inline V16i positions_to_rows(int h) {
  V16i mask;
  for (int i = 0; i < 16; ++i) mask[i] = (int32_t)rows_row_of_position(16 * h + i);
  return mask;
}

struct PermuteForm {
  static constexpr int64_t kTableBytes = kProductsBytes;

  static void build(const float* table, const float* x, int64_t K, uint8_t* T) {
    V16f t;
    std::memcpy(&t, table, sizeof(t));
    V16f* out = reinterpret_cast<V16f*>(T);
    for (int64_t k = 0; k < K; ++k) out[k] = t * x[k];  // 16 float32 products, each rounded once
  }

  static void block(const uint8_t* codes, int64_t C, const uint8_t* T, const float* absmax,
                    float* acc) {
    static const V16i order0 = positions_to_rows(0), order1 = positions_to_rows(1);
    const V16f* products = reinterpret_cast<const V16f*>(T);
    V16f s0 = {}, s1 = {};  // positions 0-15 and 16-31
    for (int64_t c = 0; c < C; ++c) {
      const V16i z0 = widen(codes + 32 * c), z1 = widen(codes + 32 * c + 16);
      const V16f& even = products[2 * c];     // k = 2c: the high nibble
      const V16f& odd = products[2 * c + 1];  // k = 2c + 1: the low nibble (lookup ignores the rest)
      s0 = s0 + (lookup(even, z0 >> 4) + lookup(odd, z0));
      s1 = s1 + (lookup(even, z1 >> 4) + lookup(odd, z1));
    }
    V16f am_lo, am_hi, a0, a1;  // absmax in row order, then in position order
    std::memcpy(&am_lo, absmax, sizeof(V16f));
    std::memcpy(&am_hi, absmax + 16, sizeof(V16f));
    std::memcpy(&a0, acc, sizeof(V16f));
    std::memcpy(&a1, acc + 16, sizeof(V16f));
    a0 = a0 + __builtin_shuffle(am_lo, am_hi, order0) * s0;
    a1 = a1 + __builtin_shuffle(am_lo, am_hi, order1) * s1;
    std::memcpy(acc, &a0, sizeof(V16f));
    std::memcpy(acc + 16, &a1, sizeof(V16f));
  }

  // acc holds each group's sums in position order.
  static void store(const float* acc, float* y, int64_t N) {
    for (int64_t g = 0; g * 32 < N; ++g)
      for (int64_t p = 0; p < 32; ++p) {
        const int64_t row = 32 * g + rows_row_of_position(p);
        if (row < N) y[row] = acc[32 * g + p];
      }
  }
};

}  // namespace

void permute_compute(const RowsArgs& a, float* y) { groups_compute<PermuteForm>(a, y); }

}  // namespace q4lab
