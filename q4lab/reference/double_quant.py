"""Double quantization: the per-block float32 absmax compressed to 8-bit codes (QLoRA §3,
"Double Quantization"; bitsandbytes ``functional.py::quantize_4bit(compress_statistics=True)``).

    offset -> center -> absmax per 256 -> reciprocal -> scale -> 8-bit encode

Rules (docs/format.md §7, §8), each one exact and reproduced by the kernels:
- offset: the mean of all absmax values, rounded ONCE to float32 from the exact sum
  (:func:`exact_mean_f32`). bitsandbytes uses torch's float32 ``mean()``, whose result depends on
  the device and the thread count; q4lab's is order-independent, so every path agrees.
- centered c = RN(absmax - offset), float32.
- groups of 256 consecutive blocks; absmax2 = max |c| per group (float32); the reciprocal and the
  scaling are the 4-bit ones (``blockwise.reciprocal_scale`` / ``scale_blocks``).
- 8-bit code = the nearest entry of the dynamic map by float32 midpoints; a value exactly on a
  midpoint goes to whichever neighbour has the EVEN index (bitsandbytes' CUDA rule); an all-zero
  group scales to 0.0 and gets code 127 (the map's 0.0).
- never a negative scale: while a code would decode to an absmax with the sign bit set, the next
  code up is stored instead (:func:`non_negative_codes`). bitsandbytes has no such step: there a
  block far below the mean absmax can decode to a slightly negative absmax, which flips the sign of
  every value in it and turns an all-zero block into -0.0. The bytes stay bitsandbytes-readable.
- decode: absmax = RN(RN(dyn[q] * absmax2) + offset): two float32 operations, not an FMA.
"""
from __future__ import annotations

import numpy as np

from ..constants import NESTED_BLOCKSIZE
from .blockwise import reciprocal_scale, scale_blocks, split_blocks
from .codebooks import _thresholds, dynamic_map

F32 = np.float32


def exponent_bins(values: np.ndarray) -> np.ndarray:
    """Exact integer accumulators for a sum of non-negative finite float32 values.

    A float32 with biased exponent E and fraction M equals m * 2^(e - 150) with
    (e, m) = (E, M | 2^23) for E > 0 and (1, M) for subnormals. bins[e] = sum of m over the values
    with that e: integer additions, so the result does not depend on order or threading. Each bin
    stays below 2^24 * count < 2^64 for fewer than 2^40 values."""
    bits = np.ascontiguousarray(values, dtype=F32).view(np.uint32).ravel()
    biased = (bits >> 23) & 0xFF
    mantissa = (bits & 0x7FFFFF).astype(np.uint64)
    mantissa = np.where(biased > 0, mantissa | np.uint64(1 << 23), mantissa)
    index = np.maximum(biased, 1).astype(np.intp)
    bins = np.zeros(256, dtype=np.uint64)
    np.add.at(bins, index, mantissa)
    return bins


def mean_from_bins(bins: np.ndarray, count: int) -> np.float32:
    """RN_f32(sum / count) where sum = sum_e bins[e] * 2^(e - 150), rounded once, ties to even.

    Written with integers in units of 2^-149 (the smallest subnormal) so it reads like the C++
    version: q, rem = divmod(sum, count); keep the top 24 significant bits of q; round up when the
    dropped part (including rem / count) exceeds half a unit in the last place, or equals it and the
    kept value is odd."""
    total = sum(int(b) << (e - 1) for e, b in enumerate(bins) if b)
    q, rem = divmod(total, count)
    shift = max(q.bit_length() - 24, 0)
    kept = q >> shift
    if shift == 0:
        round_up = 2 * rem > count or (2 * rem == count and kept & 1)
    else:
        round_bit = (q >> (shift - 1)) & 1
        sticky = (q & ((1 << (shift - 1)) - 1)) != 0 or rem != 0
        round_up = round_bit and (sticky or kept & 1)
    kept += int(round_up)
    return F32(np.ldexp(np.float64(kept), shift - 149))


def exact_mean_f32(values: np.ndarray) -> np.float32:
    """The float32 mean of non-negative finite float32 values, rounded once from the exact sum."""
    values = np.asarray(values, dtype=F32).ravel()
    if values.size == 0:
        raise ValueError("mean of an empty absmax array")
    return mean_from_bins(exponent_bins(values), values.size)


def encode_dynamic(xn: np.ndarray) -> np.ndarray:
    """8-bit code of scaled values in [-1, 1]: nearest dynamic-map entry by float32 midpoints m_k;
    x > m_k -> k+1, x < m_k -> k, x == m_k -> the even one of k, k+1."""
    midpoints, _ = _thresholds("dynamic")
    xn = np.asarray(xn, dtype=F32)
    k = np.searchsorted(midpoints, xn, side="left")  # #{m < x}: ties land on the lower index
    on_midpoint = (k < midpoints.size) & (midpoints[np.minimum(k, midpoints.size - 1)] == xn)
    k = np.where(on_midpoint & (k % 2 == 1), k + 1, k)  # tie: k odd -> k+1 is the even neighbour
    return k.astype(np.uint8)


def non_negative_codes(codes: np.ndarray, absmax2_per_code: np.ndarray, offset) -> np.ndarray:
    """Move each code up while it decodes to a negative absmax (sign bit set). Decoding is monotone
    in the code, and code 255 decodes to absmax2 + offset >= the block's absmax >= 0, so it ends."""
    codes = np.asarray(codes, dtype=np.int64).copy()
    dyn, offset = dynamic_map(), F32(offset)
    while True:
        decoded = ((dyn[codes] * absmax2_per_code).astype(F32) + offset).astype(F32)
        negative = np.signbit(decoded) & (codes < 255)
        if not negative.any():
            return codes.astype(np.uint8)
        codes[negative] += 1


def quantize_absmax(absmax: np.ndarray, offset=None):
    """Double-quantize float32 absmax values. Returns (codes uint8, absmax2 float32, offset
    float32).

    ``offset`` may be given (e.g. the ``nested_offset`` of a bitsandbytes checkpoint, to reproduce
    its codes); otherwise it is :func:`exact_mean_f32` of ``absmax``."""
    absmax = np.asarray(absmax, dtype=F32).ravel()
    offset = exact_mean_f32(absmax) if offset is None else F32(offset)
    centered = (absmax - offset).astype(F32)
    groups = split_blocks(centered, NESTED_BLOCKSIZE)
    absmax2 = np.abs(groups).max(axis=1).astype(F32)
    prescale, recip = reciprocal_scale(absmax2)
    xn = scale_blocks(groups, prescale, recip).ravel()[: absmax.size]
    per_code = np.repeat(absmax2, NESTED_BLOCKSIZE)[: absmax.size]
    return non_negative_codes(encode_dynamic(xn), per_code, offset), absmax2, F32(offset)


def dequantize_absmax(codes: np.ndarray, absmax2: np.ndarray, offset) -> np.ndarray:
    """absmax_i = RN(RN(dyn[q_i] * absmax2[i // 256]) + offset), float32."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    scale = np.repeat(np.asarray(absmax2, dtype=F32), NESTED_BLOCKSIZE)[: codes.size]
    return ((dynamic_map()[codes] * scale).astype(F32) + F32(offset)).astype(F32)
