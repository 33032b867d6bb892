// q4_element.h: the per-element arithmetic of q4lab's 4-bit format, written ONCE for C++ and CUDA.
//
// Each function is the C++ twin of one step in q4lab/reference (docs/format.md §1-§8):
//   reference/blockwise.py     block_absmax        -> q4_abs_bits / q4_max_bits (NaN-propagating)
//                              reciprocal_scale    -> q4_reciprocal_scale
//                              scale_blocks        -> q4_scale
//                              encode/count_below  -> q4_count_below / q4_encode (= q4_encode_code
//                                                     of q4_encode_rank: the two halves of encode)
//                              pack_nibbles        -> q4_pack
//                              decode              -> q4_decode
//   reference/double_quant.py  exponent_bins       -> q4_bin_of / q4_bin_mantissa
//                              mean_from_bins      -> q4_mean_from_bins (exact, rounded once)
//                              encode_dynamic      -> q4_encode_dynamic (ties to the even index)
//                              dequantize_absmax   -> q4_decode_absmax
//                              non_negative_codes  -> q4_encode_absmax_code
//   reference/api.py           round_to_bfloat16   -> q4_f32_to_bf16; numpy float16 -> q4_f32_to_f16
// Constants and tables come from q4_tables.h, GENERATED from q4lab/constants.py and the reference.
// Storage follows bitsandbytes kernels.cu::kQuantizeBlockwise (high nibble first). Compile without
// fast-math and without FMA contraction (-ffp-contract=off; nvcc --fmad=false --ftz=false), so that
// every `*`, `/`, `+` below is one IEEE-754 float32 operation rounded to nearest even.
#pragma once
#include <stdint.h>
#include <string.h>
#include "q4_tables.h"

#if defined(__CUDACC__)
#define Q4_HOST_DEVICE __host__ __device__
#else
#define Q4_HOST_DEVICE
#endif

// ---- bit views --------------------------------------------------------------------------------
// The same 4 bytes seen as another type (memcpy: defined behaviour, one register move on the host
// and on the GPU).
template <class To, class From>
Q4_HOST_DEVICE inline To q4_bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "a bit view keeps the size");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

Q4_HOST_DEVICE inline uint32_t q4_bits(float x) { return q4_bit_cast<uint32_t>(x); }
Q4_HOST_DEVICE inline float q4_float(uint32_t b) { return q4_bit_cast<float>(b); }

// ---- step 2: absmax ---------------------------------------------------------------------------
// |x| as bits. For non-negative floats the unsigned order of the bits is the numeric order, and
// every NaN (> 0x7f800000) sorts above +Inf: an unsigned max of these bits is a max |x| that
// PROPAGATES NaN and Inf (plain fmaxf would drop a NaN). It also vectorizes as an integer max.
Q4_HOST_DEVICE inline uint32_t q4_abs_bits(float x) { return q4_bits(x) & 0x7fffffffu; }
Q4_HOST_DEVICE inline uint32_t q4_max_bits(uint32_t a, uint32_t b) { return a > b ? a : b; }

// ---- step 3: power-of-two prescale and reciprocal, once per block ------------------------------
struct Q4Scale { float prescale; float recip; };

Q4_HOST_DEVICE inline Q4Scale q4_reciprocal_scale(float absmax) {
  Q4Scale s;
  s.prescale = absmax < Q4_SMALL_ABSMAX ? Q4_UPSCALE : (absmax >= Q4_LARGE_ABSMAX ? Q4_DOWNSCALE : 1.0f);
  s.recip = absmax == 0.0f ? 0.0f : 1.0f / (absmax * s.prescale);  // IEEE division, once
  return s;
}

// ---- step 4: xn = RN(RN(x * s) * r): two multiplies, never fused --------------------------------
Q4_HOST_DEVICE inline float q4_scale(float x, Q4Scale s) { return (x * s.prescale) * s.recip; }

// ---- step 5: encode ---------------------------------------------------------------------------
// Q4_MAX_THRESHOLDS (q4_tables.h): unused threshold slots hold +Inf, and `v > +Inf` never counts.

// One quant type's tables as floats, built on the host from q4_tables.h and passed by value
// (CUDA kernels get it as a launch parameter, so no __constant__ copy of the tables exists).
struct Q4Codebook {
  float threshold[Q4_MAX_THRESHOLDS];
  float value[Q4_CODES];        // dequantization table, index = code
  uint8_t code_of_rank[Q4_CODES];  // fp4: magnitude order; nf4/int4: identity
  uint8_t zero_code;               // code of 0.0: the pad nibble of an odd length (format §6)
  uint8_t is_fp4;
};

// #{k : t_k < v}: a fixed-trip loop of compares (a tie goes to the lower code).
Q4_HOST_DEVICE inline uint32_t q4_count_below(const float* t, float v) {
  uint32_t count = 0;
  for (int k = 0; k < Q4_MAX_THRESHOLDS; ++k) count += v > t[k] ? 1u : 0u;
  return count;
}

// Encode, first half: the rank of xn among the thresholds `t` (a copy of cb.threshold is fine):
// nf4/int4 count over xn (the rank IS the code), fp4 over |xn|.
Q4_HOST_DEVICE inline uint32_t q4_encode_rank(const float* t, bool is_fp4, float xn) {
  return q4_count_below(t, is_fp4 && xn < 0.0f ? -xn : xn);
}

// Encode, second half: fp4's code is order[rank] plus the sign bit from the INPUT x < 0 (so -0.0
// has no sign bit); nf4/int4's code is the rank.
Q4_HOST_DEVICE inline uint8_t q4_encode_code(const Q4Codebook& cb, uint32_t rank, float x) {
  if (!cb.is_fp4) return (uint8_t)rank;
  return (uint8_t)(cb.code_of_rank[rank] | (x < 0.0f ? Q4_FP4_SIGN_BIT : 0u));
}

Q4_HOST_DEVICE inline uint8_t q4_encode(const Q4Codebook& cb, float xn, float x) {
  return q4_encode_code(cb, q4_encode_rank(cb.threshold, cb.is_fp4, xn), x);
}

// ---- step 6: pack, element 2j in the high nibble -----------------------------------------------
Q4_HOST_DEVICE inline uint8_t q4_pack(uint32_t even_code, uint32_t odd_code) {
  return (uint8_t)((even_code << 4) | odd_code);
}

// ---- decode: out = RN(table[code] * absmax) in float32 ------------------------------------------
Q4_HOST_DEVICE inline float q4_decode(const Q4Codebook& cb, uint32_t code, float absmax) {
  return cb.value[code] * absmax;
}

// float32 -> bfloat16 bits, round to nearest even (finite inputs; NaN stays a quiet NaN).
Q4_HOST_DEVICE inline uint16_t q4_f32_to_bf16(float x) {
  uint32_t b = q4_bits(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
  return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// float32 -> float16 bits, round to nearest even, subnormals kept, overflow to Inf.
Q4_HOST_DEVICE inline uint16_t q4_f32_to_f16(float x) {
  uint32_t b = q4_bits(x);
  uint32_t sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);             // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);            // >= 65520 (or Inf): Inf
  if (a >= 0x38800000u) {                                              // normal half (>= 2^-14)
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
  }
  if (a <= 0x33000000u) return (uint16_t)sign;                         // <= 2^-25: ties to 0
  uint32_t mant = (a & 0x7fffffu) | 0x800000u, shift = 126u - (a >> 23);  // 14..24
  uint32_t half = mant >> shift, rest = mant & ((1u << shift) - 1u), mid = 1u << (shift - 1);
  half += (rest > mid || (rest == mid && (half & 1u))) ? 1u : 0u;
  return (uint16_t)(sign | half);
}

// float16 bits -> float32 (exact).
Q4_HOST_DEVICE inline float q4_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return q4_float(sign | 0x7f800000u | (m << 13));
  if (e != 0) return q4_float(sign | ((e + 112u) << 23) | (m << 13));
  float mag = (float)m * 0x1p-24f;  // exact: m < 2^10 and a power-of-two scale
  return q4_float(sign | q4_bits(mag));
}

Q4_HOST_DEVICE inline float q4_bf16_to_f32(uint16_t h) { return q4_float((uint32_t)h << 16); }

// ---- double quant: exact mean of the absmax values (reference/double_quant.py) ------------------
// A finite float32 = m * 2^(e - 150) with (e, m) = (E, M | 2^23) for E > 0, (1, M) for subnormals.
// One bin per biased exponent E = 0 .. 255 (bin 255 holds NaN/Inf).
#define Q4_EXPONENT_BINS 256

Q4_HOST_DEVICE inline uint32_t q4_bin_of(float v) {
  uint32_t biased = (q4_bits(v) >> 23) & 0xffu;
  return biased > 0 ? biased : 1u;
}
Q4_HOST_DEVICE inline uint64_t q4_bin_mantissa(float v) {
  uint32_t b = q4_bits(v);
  return (uint64_t)((b & 0x7fffffu) | (((b >> 23) & 0xffu) ? 0x800000u : 0u));
}

#define Q4_LIMBS 12  // 384 bits > 2^64 * 2^253 * 256 (the largest possible sum, in 2^-149 units)

// total = sum_e bins[e] * 2^(e - 1) in units of 2^-149, as little-endian 32-bit limbs.
Q4_HOST_DEVICE inline void q4_bins_total(const uint64_t* bins, uint32_t* limb) {
  for (int i = 0; i < Q4_LIMBS; ++i) limb[i] = 0;
  for (int e = 1; e < Q4_EXPONENT_BINS; ++e) {
    if (bins[e] == 0) continue;
    int shift = e - 1, i = shift / 32, bit = shift % 32;
    uint64_t lo = bins[e] << bit, hi = bit ? bins[e] >> (64 - bit) : 0;  // 96-bit addend
    uint32_t add[3] = {(uint32_t)lo, (uint32_t)(lo >> 32), (uint32_t)hi};
    uint64_t carry = 0;
    for (int j = i; j < Q4_LIMBS; ++j) {
      uint64_t s = (uint64_t)limb[j] + (j - i < 3 ? add[j - i] : 0u) + carry;
      limb[j] = (uint32_t)s;
      carry = s >> 32;
    }
  }
}

Q4_HOST_DEVICE inline uint32_t q4_limb_bit(const uint32_t* q, int i) { return (q[i / 32] >> (i % 32)) & 1u; }

// RN_f32(total / count), ties to even, from the exponent bins: q, rem = divmod(total, count); keep
// the top 24 significant bits of q; round up when the dropped part (with rem/count) is over half an
// ulp, or exactly half and the kept value is odd. count < 2^32, so rem fits 32 bits.
Q4_HOST_DEVICE inline float q4_mean_from_bins(const uint64_t* bins, uint64_t count) {
  uint32_t q[Q4_LIMBS];
  q4_bins_total(bins, q);
  uint64_t rem = 0;
  for (int i = Q4_LIMBS - 1; i >= 0; --i) {  // long division, 32 bits at a time
    uint64_t cur = (rem << 32) | q[i];
    q[i] = (uint32_t)(cur / count);
    rem = cur % count;
  }
  int length = 0;  // bit length of q
  for (int i = Q4_LIMBS * 32 - 1; i >= 0 && length == 0; --i)
    if (q4_limb_bit(q, i)) length = i + 1;
  int shift = length > 24 ? length - 24 : 0;
  uint32_t kept = 0;
  for (int i = shift + 23; i >= shift; --i) kept = (kept << 1) | (i < length ? q4_limb_bit(q, i) : 0u);
  bool round_up;
  if (shift == 0) {
    round_up = 2 * rem > count || (2 * rem == count && (kept & 1u));
  } else {
    bool sticky = rem != 0;
    for (int i = 0; i < shift - 1 && !sticky; ++i) sticky = q4_limb_bit(q, i) != 0;
    round_up = q4_limb_bit(q, shift - 1) && (sticky || (kept & 1u));
  }
  kept += round_up ? 1u : 0u;
  // kept * 2^(shift - 149) as float32 bits: the implicit bit of `kept` carries into the exponent
  // (also for subnormals, shift == 0, and for a round-up to 2^24).
  return q4_float(((uint32_t)shift << 23) + kept);
}

// ---- double quant: 8-bit dynamic code ----------------------------------------------------------
struct Q4Dynamic {
  float midpoint[Q4_DYNAMIC_CODES];  // 255 midpoints, then +Inf
  float value[Q4_DYNAMIC_CODES];
};

// Nearest dynamic-map entry: k = #{m < x} by a branchless binary search over the 255 midpoints
// (padded with +Inf to 256), then an exact tie goes to the even one of k, k + 1 (bitsandbytes'
// CUDA rule).
Q4_HOST_DEVICE inline uint32_t q4_count_below_dynamic(const Q4Dynamic& dyn, float x) {
  uint32_t k = 0;
  for (uint32_t step = Q4_DYNAMIC_CODES / 2; step > 0; step >>= 1)
    k += step * (uint32_t)(dyn.midpoint[k + step - 1] < x);  // multiply, not a branch
  return k;
}

Q4_HOST_DEVICE inline uint8_t q4_dynamic_tie_to_even(const Q4Dynamic& dyn, uint32_t k, float x) {
  return (uint8_t)(k < Q4_DYNAMIC_CODES - 1 && dyn.midpoint[k] == x && (k & 1u) ? k + 1 : k);
}

Q4_HOST_DEVICE inline uint8_t q4_encode_dynamic(const Q4Dynamic& dyn, float x) {
  return q4_dynamic_tie_to_even(dyn, q4_count_below_dynamic(dyn, x), x);
}

// absmax = RN(RN(dyn[q] * absmax2) + offset): two operations, not an FMA.
Q4_HOST_DEVICE inline float q4_decode_absmax(const Q4Dynamic& dyn, uint32_t code, float absmax2,
                                             float offset) {
  float scaled = dyn.value[code] * absmax2;
  return scaled + offset;
}

// The stored code of one absmax: the nearest code, moved up while it would decode to a negative
// absmax (sign bit set). A block far below the mean absmax can otherwise decode to a negative
// scale, flipping its values' signs and turning an all-zero block into -0.0. Decoding is monotone
// in the code and code 255 decodes to absmax2 + offset >= the block's absmax >= 0, so this ends.
Q4_HOST_DEVICE inline uint8_t q4_encode_absmax_code(const Q4Dynamic& dyn, float xn, float absmax2,
                                                    float offset) {
  uint32_t code = q4_encode_dynamic(dyn, xn);
  while (code < Q4_DYNAMIC_CODES - 1 && (q4_bits(q4_decode_absmax(dyn, code, absmax2, offset)) >> 31))
    ++code;
  return (uint8_t)code;
}

// ---- building the tables from q4_tables.h (host) ----------------------------------------------
// Q4QuantType (Q4_NF4, Q4_FP4, Q4_INT4) and the per-type tables are generated in q4_tables.h.
inline Q4Codebook q4_make_codebook(Q4QuantType qt) {
  const uint32_t* t = Q4_THRESHOLD_BITS[qt];
  const uint32_t* v = Q4_CODEBOOK_BITS[qt];
  const int nt = Q4_THRESHOLD_COUNT[qt];
  const int magnitudes = Q4_CODES / 2;  // fp4: 3-bit magnitude codes below the sign bit
  Q4Codebook cb;
  for (int k = 0; k < Q4_MAX_THRESHOLDS; ++k) cb.threshold[k] = q4_float(k < nt ? t[k] : 0x7f800000u);
  for (int c = 0; c < Q4_CODES; ++c) {
    cb.value[c] = q4_float(v[c]);
    cb.code_of_rank[c] = (uint8_t)(qt == Q4_FP4 ? (c < magnitudes ? Q4_FP4_ORDER[c] : 0) : c);
  }
  cb.zero_code = Q4_ZERO_CODE[qt];
  cb.is_fp4 = qt == Q4_FP4;
  return cb;
}

inline Q4Dynamic q4_make_dynamic() {
  Q4Dynamic d;
  for (int k = 0; k < Q4_DYNAMIC_CODES; ++k) {
    d.midpoint[k] = q4_float(k < Q4_DYNAMIC_CODES - 1 ? Q4_DYNAMIC_MIDPOINT_BITS[k] : 0x7f800000u);
    d.value[k] = q4_float(Q4_DYNAMIC_MAP_BITS[k]);
  }
  return d;
}

// The dynamic map, built once per process (host; thread-safe static initialisation): the ops use
// this instead of rebuilding its 2 KiB on every call (the fused matmul runs once per layer per token).
inline const Q4Dynamic& q4_dynamic() {
  static const Q4Dynamic d = q4_make_dynamic();
  return d;
}
