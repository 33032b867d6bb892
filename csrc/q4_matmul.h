// q4_matmul.h: the arithmetic of the fused 4-bit matmul y = x . W^T, written ONCE for C++ and CUDA.
//
// Each function is the C++ twin of one step of q4lab/reference/matmul.py (docs/format.md, "Fused
// matmul"):
//   step 1  p = RN(table[code] * x_k)                     -> q4_mm_product
//   step 2  lane of flat index e = e mod 32               -> q4_mm_lane
//   step 4  s = RN(s + p), per segment and lane            -> q4_mm_add
//   step 5  acc = RN(acc + RN(absmax * s))                 -> q4_mm_scale_add
//   step 6  lane tree of widths 16, 8, 4, 2, 1             -> q4_mm_lane_tree (host; CUDA uses
//                                                             __shfl_down_sync with the same widths)
//   step 7  y = RN(y + bias)                               -> q4_mm_add
// The SIMD loops of q4_matmul_cpu.cpp are vector forms of exactly these operations. Compiled without
// FMA contraction (-ffp-contract=off, nvcc --fmad=false): each * and + is one IEEE float32 rounding.
#pragma once
#include "q4_element.h"

#define Q4_MM_LANES 32

Q4_HOST_DEVICE inline float q4_mm_product(const Q4Codebook& cb, uint32_t code, float x) {
  return cb.value[code] * x;
}

Q4_HOST_DEVICE inline uint32_t q4_mm_lane(int64_t flat_index) { return (uint32_t)(flat_index & 31); }

Q4_HOST_DEVICE inline float q4_mm_add(float s, float p) { return s + p; }

Q4_HOST_DEVICE inline float q4_mm_scale_add(float acc, float absmax, float s) {
  const float scaled = absmax * s;  // rounded on its own: never fused with the add
  return acc + scaled;
}

// acc[0..31] -> the row's sum: acc[l] = RN(acc[l] + acc[l + w]) for l < w, w = 16, 8, 4, 2, 1.
Q4_HOST_DEVICE inline float q4_mm_lane_tree(float* acc) {
  for (int w = 16; w >= 1; w >>= 1)
    for (int l = 0; l < w; ++l) acc[l] = acc[l] + acc[l + w];
  return acc[0];
}

// The 4-bit code of flat element e of a packed tensor (element 2j in the high nibble of byte j).
Q4_HOST_DEVICE inline uint32_t q4_code_at(const uint8_t* packed, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return (e & 1) ? (uint32_t)(byte & 15u) : (uint32_t)(byte >> 4);
}

// The float32 absmax of block b: stored as is, or decoded from its 8-bit code (double quant) by
// q4_decode_absmax, one block at a time inside the matmul loop (no decoded copy is materialised).
struct Q4AbsmaxSource {
  const float* absmax;    // plain: one float per block (nullptr when nested)
  const uint8_t* codes;   // nested: one code per block
  const float* absmax2;   // nested: one float per group of nested blocks
  float offset;
  int nested_shift;       // log2 of the nested blocksize (a shift: a division costs ~40 cycles)
};

Q4_HOST_DEVICE inline float q4_block_absmax(const Q4AbsmaxSource& src, const Q4Dynamic& dyn,
                                            int64_t b) {
  if (src.absmax) return src.absmax[b];
  return q4_decode_absmax(dyn, src.codes[b], src.absmax2[b >> src.nested_shift], src.offset);
}
