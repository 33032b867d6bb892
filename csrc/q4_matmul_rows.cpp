// q4_matmul_rows.cpp: the `rows` form of torch.ops.q4lab.matmul_4bit on the CPU (AVX2): 32 output
// rows per step, one x_k and its 16 products serving all 32, on the decode layout.
//
// Specification: q4lab/reference/matmul.py, order pair-chain-v2 (docs/format.md, "Fused matmul"):
// per row and block s = +0.0, then s = RN(s + RN(p[2j] + p[2j+1])) over the block's bytes, then
// acc = RN(acc + RN(absmax * s)) block by block from acc = +0.0. Every row's chain is the spec's
// chain; only WHICH rows run side by side changes, so the bytes equal the reference's (and every
// other form's) for any thread count.
//
// Why this form (issue 21; measured on a 2-core AVX2 Zen machine, bench/bench_infer.py): a 4-bit
// GEMV is bound by the lookup of 16 codebook products, not by memory. Vectorizing across output
// rows turns that lookup into byte shuffles: the 16 products RN(t[v] * x_k) (float32, 64 bytes) are
// built once per k and stored as 4 byte planes; `vpshufb` then looks up one plane for 32 rows at
// once, and 8 unpacks rebuild the 32 floats. Per 64 weights: 8 shuffles, 16 unpacks, 8 adds, and
// one 32-byte load of codes (no multiply in the loop: the products are exact table entries).
//
// Decode layout (q4lab.matmul.repack_rows; docs/format.md, "Decode layout"), K % B == 0:
//   packed  uint8 (K/B, G, B/2, 32), G = ceil(N/32): [b][g][c][p] is the stored byte c of block b of
//           row 32g + row_of_position(p) (bitsandbytes' byte: high nibble = even k), 0 past N;
//   absmax  float32 (K/B, 32G): the decoded absmax of row 32g + r in block b, 0 past N.
// Position p of a 32-byte vector holds row row_of_position(p) so that after the unpacks register j
// holds rows 8j .. 8j+7 in order (vpunpck works inside 128-bit lanes).
#include <cstring>
#include "q4_matmul_rows.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace q4lab {

int64_t rows_row_of_position(int64_t p) {
  return p < 16 ? 8 * (p / 4) + p % 4 : 8 * ((p - 16) / 4) + 4 + (p - 16) % 4;
}

#if defined(__AVX2__)
bool rows_form_available() { return true; }

namespace {

constexpr int kPlaneBytes = 32;              // one 16-byte plane, twice (both 128-bit lanes)
constexpr int kProductBytes = 4 * kPlaneBytes;  // the 4 byte planes of one k's 16 products

// The byte planes of RN(t[v] * x[k]) for k in [0, nk): T[k][plane][lane copy][v].
inline void build_planes(const float* table, const float* x, int64_t nk, uint8_t* T) {
  const __m256 t_lo = _mm256_loadu_ps(table), t_hi = _mm256_loadu_ps(table + 8);
  // Inside each 128-bit lane: bytes of 4 floats regrouped plane by plane.
  const __m256i by_plane = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t k = 0; k < nk; ++k) {
    const __m256 xk = _mm256_set1_ps(x[k]);
    const __m256i a = _mm256_shuffle_epi8(_mm256_castps_si256(_mm256_mul_ps(t_lo, xk)), by_plane);
    const __m256i b = _mm256_shuffle_epi8(_mm256_castps_si256(_mm256_mul_ps(t_hi, xk)), by_plane);
    __m128 r0 = _mm_castsi128_ps(_mm256_castsi256_si128(a));       // v 0-3: planes 0..3
    __m128 r1 = _mm_castsi128_ps(_mm256_extracti128_si256(a, 1));  // v 4-7
    __m128 r2 = _mm_castsi128_ps(_mm256_castsi256_si128(b));       // v 8-11
    __m128 r3 = _mm_castsi128_ps(_mm256_extracti128_si256(b, 1));  // v 12-15
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);                             // r_i = plane i of v 0-15
    uint8_t* t = T + k * kProductBytes;
    const __m128 planes[4] = {r0, r1, r2, r3};
    for (int i = 0; i < 4; ++i)
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + i * kPlaneBytes),
                         _mm256_broadcastsi128_si256(_mm_castps_si128(planes[i])));
  }
}

// The products of 32 rows whose codes are `idx` (one per byte), as 4 registers of rows 8j..8j+7.
inline void lookup32(const uint8_t* planes, __m256i idx, __m256 f[4]) {
  const __m256i* P = reinterpret_cast<const __m256i*>(planes);
  const __m256i b0 = _mm256_shuffle_epi8(_mm256_load_si256(P), idx);
  const __m256i b1 = _mm256_shuffle_epi8(_mm256_load_si256(P + 1), idx);
  const __m256i b2 = _mm256_shuffle_epi8(_mm256_load_si256(P + 2), idx);
  const __m256i b3 = _mm256_shuffle_epi8(_mm256_load_si256(P + 3), idx);
  const __m256i w01_lo = _mm256_unpacklo_epi8(b0, b1), w01_hi = _mm256_unpackhi_epi8(b0, b1);
  const __m256i w23_lo = _mm256_unpacklo_epi8(b2, b3), w23_hi = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01_lo, w23_lo));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01_lo, w23_lo));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01_hi, w23_hi));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01_hi, w23_hi));
}

// One block of one group of 32 rows: s = chain of pair terms over the block's C byte columns,
// then acc = RN(acc + RN(absmax * s)) for the 32 rows.
inline void group_block(const uint8_t* codes, int64_t C, const uint8_t* T, const float* absmax,
                        float* acc) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  // v >> 4 in 16-bit lanes as a multiply-high by 2^12: the same bits, computed on the multiply
  // port instead of the shuffle ports, which the lookups keep busy (a Zen 1 shift shares them).
  const __m256i shift4 = _mm256_set1_epi16(1 << 12);
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                 _mm256_setzero_ps()};
  for (int64_t c = 0; c < C; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * c));
    const __m256i even_k = _mm256_and_si256(_mm256_mulhi_epu16(v, shift4), low4);  // high nibble
    const __m256i odd_k = _mm256_and_si256(v, low4);
    __m256 a[4], b[4];
    lookup32(T + (2 * c) * kProductBytes, even_k, a);
    lookup32(T + (2 * c + 1) * kProductBytes, odd_k, b);
    for (int j = 0; j < 4; ++j) s[j] = _mm256_add_ps(s[j], _mm256_add_ps(a[j], b[j]));
  }
  for (int j = 0; j < 4; ++j) {
    const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(absmax + 8 * j), s[j]);
    _mm256_storeu_ps(acc + 8 * j, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * j), scaled));
  }
}

struct RowsForm {
  static constexpr int64_t kTableBytes = kProductBytes;
  static void build(const float* table, const float* x, int64_t K, uint8_t* T) {
    build_planes(table, x, K, T);
  }
  static void block(const uint8_t* codes, int64_t C, const uint8_t* T, const float* absmax,
                    float* acc) {
    group_block(codes, C, T, absmax, acc);
  }
  // After the unpacks the sums are in row order: a plain copy.
  static void store(const float* acc, float* y, int64_t N) {
    std::memcpy(y, acc, sizeof(float) * N);
  }
};

}  // namespace

void rows_compute(const RowsArgs& a, float* y) { groups_compute<RowsForm>(a, y); }
#else
bool rows_form_available() { return false; }
void rows_compute(const RowsArgs&, float*) {}
#endif

}  // namespace q4lab
