// q4_formats.h: the per-element and per-block arithmetic of MXFP4, NVFP4 and GGUF's Q4_0 / Q4_1 /
// Q4_K / IQ4_NL, written ONCE for C++ and CUDA (host + device). Each function is the twin of one
// step of the NumPy specification, whose docstrings hold every rounding rule (docs/formats.md):
//   reference/mx.py           e2m1_encode (RN, ties to even code, saturate at 6) -> q4f_e2m1_encode
//                             e8m0_exponent / e8m0_decode         -> q4f_e8m0_code / q4f_e8m0_value
//                             e4m3_encode / e4m3_decode           -> q4f_e4m3_encode / _value
//                             mxfp4_quantize, nvfp4_quantize -> q4f_mxfp4_block, q4f_nvfp4_block
//   reference/gguf_quants.py  q4_0_quantize, q4_1_quantize   -> q4f_q4_0_block, q4f_q4_1_block
//                             *_dequantize                        -> q4f_*_dequant_block
// Sources: OCP MX v1.0 §5-§6; torchao prototype/mx_formats (to_mx FLOOR, nvfp4_quantize);
// ggml-quants.c / gguf-py quants.py. Compiled like q4_element.h: no fast-math, no FMA contraction
// (-ffp-contract=off; nvcc --fmad=false --ftz=false), every * / + - one IEEE float32 rounding.
#pragma once
#include <stdint.h>
#include "q4_element.h"  // q4_bits, q4_float, q4_f32_to_f16, q4_f16_to_f32, Q4_HOST_DEVICE

// ---- E2M1 (both MX formats) -------------------------------------------------------------------
// Code = sign bit (from the float32 sign bit) | index of the nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}
// (a tie goes to the even index); |v| >= 5 rounds up only above 5, |v| >= 6 saturates to code 7.
Q4_HOST_DEVICE inline uint8_t q4f_e2m1_encode(float v) {
  const float mids[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  uint32_t b = q4_bits(v);
  float m = q4_float(b & 0x7fffffffu);
  uint8_t idx = 0;
  for (int k = 0; k < 7; ++k) idx += (mids[k] < m) ? 1 : 0;
  if (idx < 7 && m == mids[idx] && (idx & 1u)) idx += 1;  // on a tie: the even index
  return (uint8_t)(idx | ((b >> 28) & 0x8u));
}

Q4_HOST_DEVICE inline float q4f_e2m1_value(uint8_t code) {
  const float mags[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  float m = mags[code & 7u];
  return (code & 8u) ? -m : m;
}

// ---- E8M0 (MXFP4's scale) ---------------------------------------------------------------------
// code = clamp(exponent field of amax - 127 - 2, -127, 127) + 127 (amax finite, >= 0).
Q4_HOST_DEVICE inline uint8_t q4f_e8m0_code(float amax) {
  int e = (int)((q4_bits(amax) >> 23) & 0xffu) - 127 - 2;
  e = e < -127 ? -127 : (e > 127 ? 127 : e);
  return (uint8_t)(e + 127);
}

// 2^(code - 127) exactly (code 0: the subnormal 2^-127), code 255: NaN.
Q4_HOST_DEVICE inline float q4f_e8m0_value(uint8_t code) {
  if (code == 255u) return q4_float(0x7fc00000u);
  return code == 0u ? q4_float(0x00400000u) : q4_float((uint32_t)code << 23);
}

// ---- E4M3 (NVFP4's block scale, "fn": no inf, 0x7f NaN) ----------------------------------------
Q4_HOST_DEVICE inline float q4f_e4m3_value(uint8_t code) {
  uint32_t e = (code >> 3) & 0xfu, m = code & 7u;
  if ((code & 0x7fu) == 0x7fu) return q4_float(0x7fc00000u);
  float mag = e == 0u ? (float)m * q4_float(0x3b000000u)                 // m/8 * 2^-6 = m * 2^-9
                      : q4_float(((e + 120u) << 23) | (m << 20));        // (1 + m/8) * 2^(e-7)
  return (code & 0x80u) ? -mag : mag;
}

// v in [2^-6, 448] (NVFP4 clamps first): round the float32 mantissa to 3 bits, ties to even.
Q4_HOST_DEVICE inline uint8_t q4f_e4m3_encode(float v) {
  uint32_t b = q4_bits(v);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fu;                    // NaN
  uint32_t e = ((b >> 23) & 0xffu) - 120u, keep = (b >> 20) & 7u, rest = b & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (keep & 1u))) keep += 1u;
  if (keep == 8u) { keep = 0u; e += 1u; }
  return (uint8_t)((e << 3) | keep);
}

// ---- MXFP4: one block of 32 ---------------------------------------------------------------------
// Returns the E8M0 code; codes[i] = E2M1(RN(x[i] / max(2^(code-127), 2^-126))).
Q4_HOST_DEVICE inline uint8_t q4f_mxfp4_block(const float* x, int n, uint8_t* codes) {
  uint32_t amax = 0;
  for (int i = 0; i < n; ++i) amax = q4_max_bits(amax, q4_abs_bits(x[i]));
  uint8_t scale = q4f_e8m0_code(q4_float(amax));
  float divisor = scale == 0u ? q4_float(0x00800000u) : q4f_e8m0_value(scale);  // torchao clamp
  for (int i = 0; i < n; ++i) codes[i] = q4f_e2m1_encode(x[i] / divisor);
  return scale;
}

// ---- NVFP4: one block of 16 ---------------------------------------------------------------------
// has_g: two-level (g = the float32 tensor scale, inv_g = RN(1 / g)). Returns the E4M3 code.
Q4_HOST_DEVICE inline float q4f_clamp(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);  // NaN passes through (as torch.clamp)
}

Q4_HOST_DEVICE inline uint8_t q4f_nvfp4_block(const float* x, int n, bool has_g, float g,
                                              uint8_t* codes) {
  uint32_t amax = 0;
  for (int i = 0; i < n; ++i) amax = q4_max_bits(amax, q4_abs_bits(x[i]));
  float block_scale = q4_float(amax) / 6.0f;
  if (has_g) block_scale = block_scale / g;
  uint8_t scale = q4f_e4m3_encode(q4f_clamp(block_scale, q4_float(0x3c800000u), 448.0f));
  float stored = q4f_e4m3_value(scale);
  float recip = has_g ? (1.0f / g) / stored : 1.0f / stored;
  for (int i = 0; i < n; ++i) codes[i] = q4f_e2m1_encode(q4f_clamp(x[i] * recip, -6.0f, 6.0f));
  return scale;
}

// ---- GGUF Q4_0 / Q4_1: one block of 32 -> 18 / 20 bytes -----------------------------------------
// min(15, low byte of int32(trunc(v))); 0 for NaN / out of int32 range (x86's cvttss2si gives
// 0x80000000 there, which is what gguf-py's astype(np.uint8) stores): reference u8_code.
Q4_HOST_DEVICE inline uint8_t q4f_trunc_code(float v) {
  if (!(v >= -2147483648.0f && v < 2147483648.0f)) return 0;
  uint8_t low = (uint8_t)((uint32_t)(int32_t)v & 0xffu);
  return low < 15u ? low : (uint8_t)15u;
}

// Block min / max in NumPy's AVX2 reduction order (reference block_min_max): it fixes which zero
// a block of +0.0 and -0.0 reports. op(a, b) keeps a only when strictly smaller (larger).
Q4_HOST_DEVICE inline float q4f_pick(float a, float b, bool want_max) {
  return want_max ? (a > b ? a : b) : (a < b ? a : b);
}

Q4_HOST_DEVICE inline float q4f_block_min_max(const float* x, bool want_max) {
  float acc[8];
  for (int l = 0; l < 8; ++l) acc[l] = x[0];
  for (int k = 0; k < 3; ++k)
    for (int l = 0; l < 8; ++l) acc[l] = q4f_pick(acc[l], x[1 + 8 * k + l], want_max);
  for (int l = 0; l < 4; ++l) acc[l] = q4f_pick(acc[l], acc[l + 4], want_max);
  for (int l = 0; l < 2; ++l) acc[l] = q4f_pick(acc[l], acc[l + 2], want_max);
  float r = q4f_pick(acc[0], acc[1], want_max);
  for (int i = 25; i < 32; ++i) r = q4f_pick(r, x[i], want_max);
  return r;
}

Q4_HOST_DEVICE inline void q4f_put_f16(uint8_t* out, float v) {
  uint16_t h = q4_f32_to_f16(v);
  out[0] = (uint8_t)(h & 0xffu);
  out[1] = (uint8_t)(h >> 8);
}

Q4_HOST_DEVICE inline float q4f_get_f16(const uint8_t* in) {
  return q4_f16_to_f32((uint16_t)(in[0] | (in[1] << 8)));
}

Q4_HOST_DEVICE inline void q4f_pack_pairs(const uint8_t* codes, uint8_t* qs) {
  for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(codes[j] | (codes[j + 16] << 4));
}

Q4_HOST_DEVICE inline void q4f_q4_0_block(const float* x, uint8_t* out) {
  // The first of equal magnitudes, starting from x[0] as gguf-py's argmax does (ggml's C starts
  // from +0.0, which differs only in the sign of d for an all-zero block starting with -0.0).
  float amax = q4_float(q4_abs_bits(x[0])), signed_max = x[0];
  for (int i = 1; i < 32; ++i) {
    float a = q4_float(q4_abs_bits(x[i]));
    if (amax < a) { amax = a; signed_max = x[i]; }
  }
  float d = signed_max / -8.0f;
  float inv = d == 0.0f ? 0.0f : 1.0f / d;
  uint8_t codes[32];
  for (int i = 0; i < 32; ++i) codes[i] = q4f_trunc_code(x[i] * inv + 8.5f);
  q4f_put_f16(out, d);
  q4f_pack_pairs(codes, out + 2);
}

Q4_HOST_DEVICE inline void q4f_q4_1_block(const float* x, uint8_t* out) {
  float lo = q4f_block_min_max(x, false), hi = q4f_block_min_max(x, true);
  float d = (hi - lo) / 15.0f;
  float inv = d == 0.0f ? 0.0f : 1.0f / d;
  uint8_t codes[32];
  for (int i = 0; i < 32; ++i) codes[i] = q4f_trunc_code((x[i] - lo) * inv + 0.5f);
  q4f_put_f16(out, d);
  q4f_put_f16(out + 2, lo);
  q4f_pack_pairs(codes, out + 4);
}

// ---- GGUF dequantization: one block -> 32 (256 for Q4_K) float32 --------------------------------
Q4_HOST_DEVICE inline uint8_t q4f_pair_code(const uint8_t* qs, int i) {
  return i < 16 ? (uint8_t)(qs[i] & 0xfu) : (uint8_t)(qs[i - 16] >> 4);
}

Q4_HOST_DEVICE inline void q4f_q4_0_dequant_block(const uint8_t* in, float* out) {
  float d = q4f_get_f16(in);
  for (int i = 0; i < 32; ++i) out[i] = d * (float)((int)q4f_pair_code(in + 2, i) - 8);
}

Q4_HOST_DEVICE inline void q4f_q4_1_dequant_block(const uint8_t* in, float* out) {
  float d = q4f_get_f16(in), m = q4f_get_f16(in + 2);
  for (int i = 0; i < 32; ++i) out[i] = d * (float)q4f_pair_code(in + 4, i) + m;
}

Q4_HOST_DEVICE inline void q4f_iq4_nl_dequant_block(const uint8_t* in, float* out) {
  const int8_t kvalues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                              1, 13, 25, 38, 53, 69, 89, 113};
  float d = q4f_get_f16(in);
  for (int i = 0; i < 32; ++i) out[i] = d * (float)kvalues[q4f_pair_code(in + 2, i)];
}

// ggml get_scale_min_k4: the 6-bit scale and min of sub-block j (0..7) from the 12 bytes.
Q4_HOST_DEVICE inline void q4f_k4_scale_min(const uint8_t* s, int j, uint8_t* sc, uint8_t* mn) {
  if (j < 4) {
    *sc = s[j] & 63u;
    *mn = s[j + 4] & 63u;
  } else {
    *sc = (uint8_t)((s[j + 4] & 0xfu) | ((s[j - 4] >> 6) << 4));
    *mn = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

Q4_HOST_DEVICE inline void q4f_q4_k_dequant_block(const uint8_t* in, float* out) {
  float d = q4f_get_f16(in), dmin = q4f_get_f16(in + 2);
  const uint8_t* qs = in + 16;
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, mn;
    q4f_k4_scale_min(in + 4, j, &sc, &mn);
    float scale = d * (float)sc, offset = dmin * (float)mn;
    const uint8_t* q = qs + 32 * (j / 2);
    for (int i = 0; i < 32; ++i) {
      uint8_t code = (j & 1) ? (uint8_t)(q[i] >> 4) : (uint8_t)(q[i] & 0xfu);
      out[32 * j + i] = scale * (float)code - offset;
    }
  }
}
