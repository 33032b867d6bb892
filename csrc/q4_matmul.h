// q4_matmul.h: the arithmetic of the fused 4-bit matmul y = x . W^T, written ONCE for C++ and CUDA.
//
// Each function is the C++ twin of one step of q4lab/reference/matmul.py, summation order
// pair-chain-v2 (docs/format.md, "Fused matmul"):
//   step 1  p = RN(table[code] * x_k)                     -> q4_mm_product
//   step 3  pair term q = RN(p[2j] + p[2j+1])              -> q4_mm_add (a lone element: q = p)
//   step 4  s = RN(s + q), one chain per row and block     -> q4_mm_add
//   step 5  acc = RN(acc + RN(absmax * s))                 -> q4_mm_scale_add
//   step 6  y = RN(y + bias)                               -> q4_mm_add
// The SIMD loops of q4_matmul_cpu.cpp are vector forms of exactly these operations. Compiled without
// FMA contraction (-ffp-contract=off, nvcc --fmad=false): each * and + is one IEEE float32 rounding.
#pragma once
#include "q4_element.h"

Q4_HOST_DEVICE inline float q4_mm_product_of(const float* value, uint32_t code, float x) {
  return value[code] * x;  // value: the 16 codebook values (in registers, or CUDA shared memory)
}

Q4_HOST_DEVICE inline float q4_mm_product(const Q4Codebook& cb, uint32_t code, float x) {
  return q4_mm_product_of(cb.value, code, x);
}

Q4_HOST_DEVICE inline float q4_mm_add(float s, float p) { return s + p; }

Q4_HOST_DEVICE inline float q4_mm_scale_add(float acc, float absmax, float s) {
  const float scaled = absmax * s;  // rounded on its own: never fused with the add
  return acc + scaled;
}

// The 4-bit code of flat element e of a packed tensor (element 2j in the high nibble of byte j).
Q4_HOST_DEVICE inline uint32_t q4_code_at(const uint8_t* packed, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return (e & 1) ? (uint32_t)(byte & 15u) : (uint32_t)(byte >> 4);
}

// Steps 1, 3 and 4 for the segment [start, end) of a row whose first flat index is row_begin:
// the byte pairs of the segment, with a lone element at an odd start or an odd end. `x(k)` is the
// float32 input of column k (a functor, so CUDA needs no extended lambdas).
template <class X>
Q4_HOST_DEVICE inline float q4_mm_segment_sum(const Q4Codebook& cb, const uint8_t* packed,
                                              int64_t row_begin, int64_t start, int64_t end,
                                              const X& x) {
  float s = 0.0f;
  int64_t e = start;
  if (e & 1) {
    s = q4_mm_add(s, q4_mm_product(cb, q4_code_at(packed, e), x(e - row_begin)));
    ++e;
  }
  for (; e + 1 < end; e += 2) {
    const uint32_t byte = packed[e >> 1];
    s = q4_mm_add(s, q4_mm_add(q4_mm_product(cb, byte >> 4, x(e - row_begin)),
                               q4_mm_product(cb, byte & 15u, x(e + 1 - row_begin))));
  }
  if (e < end) s = q4_mm_add(s, q4_mm_product(cb, q4_code_at(packed, e), x(e - row_begin)));
  return s;
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
