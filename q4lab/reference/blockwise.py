"""Blockwise absmax quantization to 4-bit codes: the named steps of docs/format.md §1-§6, one
function each.

Source: QLoRA (arXiv 2305.14314) §2 "Block-wise k-bit Quantization"; storage layout of bitsandbytes
``kernels.cu::kQuantizeBlockwise`` / ``kDequantizeBlockwise`` (high nibble first, one float32 absmax
per block). The rounding rules are q4lab's and every one is written down here:

    flatten -> absmax per block -> reciprocal -> scale -> encode -> pack

The C++ and CUDA kernels (``csrc/q4_element.h``) implement exactly these functions, line for line.
"""
from __future__ import annotations

import numpy as np

from .. import constants
from ..constants import BLOCKSIZES, FP4_SIGN_BIT  # noqa: F401  (BLOCKSIZES: re-exported)
from .codebooks import _thresholds, codebook, zero_code

F32 = np.float32

#: Blocks whose absmax lies outside [2^-126, 2^126) are rescaled by an exact power of two first
#: (constants.SMALL_ABSMAX ... DOWNSCALE, as float32).
SMALL_ABSMAX, LARGE_ABSMAX = F32(constants.SMALL_ABSMAX), F32(constants.LARGE_ABSMAX)
UPSCALE, DOWNSCALE = F32(constants.UPSCALE), F32(constants.DOWNSCALE)


def split_blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """Step 1. View the flat float32 data as (nblocks, blocksize), zero-padding the tail block.

    The padding zeros never raise the absmax and their codes are never stored except as the pad
    nibble of an odd-length input, which is the zero code (docs/format.md §6)."""
    n = flat.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, dtype=F32)
    padded[:n] = flat
    return padded.reshape(nblocks, blocksize)


def block_absmax(blocks: np.ndarray) -> np.ndarray:
    """Step 2. absmax = max |x| over each block, float32, stored as is (exactly one input's
    magnitude). NaN must not be dropped: NumPy's max propagates it, and callers reject non-finite
    input before this point (docs/format.md §9)."""
    return np.abs(blocks).max(axis=1).astype(F32)


def reciprocal_scale(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 3. Per block, a power-of-two prescale ``s`` and the reciprocal
    ``r = RN(1 / (absmax*s))``.

    - Ordinary blocks (2^-126 <= absmax < 2^126, i.e. every real weight): s = 1 and
      r = 1/absmax correctly rounded in float32 (IEEE division, once per block).
    - absmax == 0 (all-zero block): s = 1 and r = 0, so every scaled value is +-0 and encodes to
      the zero code (never 0 * inf = NaN).
    - absmax < 2^-126 (subnormal): s = 2^24; absmax >= 2^126: s = 2^-24. 1/absmax would overflow
      to inf, or be a subnormal that has lost precision; multiplying by a power of two is exact
      (apart from values already below the smallest threshold), so the block is scaled as if it
      were an ordinary one. Subnormals are never flushed.
    """
    absmax = np.asarray(absmax, dtype=F32)
    prescale = np.where(absmax < SMALL_ABSMAX, UPSCALE, F32(1.0)).astype(F32)
    prescale = np.where(absmax >= LARGE_ABSMAX, DOWNSCALE, prescale).astype(F32)
    with np.errstate(divide="ignore"):
        recip = (F32(1.0) / (absmax * prescale)).astype(F32)
    recip = np.where(absmax == 0, F32(0.0), recip).astype(F32)
    return prescale, recip


def scale_blocks(blocks: np.ndarray, prescale: np.ndarray, recip: np.ndarray) -> np.ndarray:
    """Step 4. xn = RN(RN(x * s) * r): two float32 multiplies (the first exact for ordinary blocks
    where s = 1), never a division per element, never fused into an FMA."""
    pre = (blocks * prescale[:, None]).astype(F32)
    return (pre * recip[:, None]).astype(F32)


def encode(xn: np.ndarray, x: np.ndarray, quant_type: str) -> np.ndarray:
    """Step 5. 4-bit code of each scaled value (uint8 in 0..15).

    nf4 / int4: code = #{k : t_k < xn}, t_k the float32 midpoints (codebooks.thresholds); a value
    exactly on a threshold goes to the lower code.
    fp4: sign bit 0b1000 iff the *input* x < 0 (so -0.0 has no sign bit; a tiny negative value whose
    magnitude rounds to 0 gets code 0b1000, which decodes to +0.0); magnitude code =
    order[#{k : t_k < |xn|}] over the sorted magnitudes (ties to the smaller magnitude).
    """
    thresholds, order = _thresholds(quant_type)
    if quant_type == "fp4":
        rank = count_below(thresholds, np.abs(xn))
        sign = np.where(x < 0, np.uint8(FP4_SIGN_BIT), np.uint8(0))
        return (order[rank] | sign).astype(np.uint8)
    return order[count_below(thresholds, xn)]


def count_below(thresholds: np.ndarray, values: np.ndarray) -> np.ndarray:
    """#{k : t_k < v} for each value, as uint8: one vectorized compare-and-add per threshold."""
    counts = np.zeros(values.shape, dtype=np.uint8)
    for t in thresholds:
        counts += values > t
    return counts


def pack_nibbles(codes: np.ndarray, quant_type: str) -> np.ndarray:
    """Step 6. Two codes per byte: element 2j in the HIGH nibble, 2j+1 in the low nibble
    (bitsandbytes' order). An odd count is padded with the zero code. Returns uint8 (ceil(n/2),)."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    if codes.size % 2:
        codes = np.concatenate([codes, np.array([zero_code(quant_type)], dtype=np.uint8)])
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes, high nibble first."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:n]


#: Elements per chunk: the reference works on cache-sized runs of whole blocks (results do not
#: depend on it; it only avoids allocating tensor-sized temporaries).
CHUNK_ELEMENTS = 1 << 15


def quantize_blocks(flat: np.ndarray, blocksize: int, quant_type: str):
    """Steps 1-6 on a flat float32 array: returns (packed uint8, absmax float32 per block)."""
    n = flat.size
    nblocks = -(-n // blocksize)
    packed = np.empty(-(-n // 2), dtype=np.uint8)
    absmax = np.empty(nblocks, dtype=F32)
    per_chunk = max(1, CHUNK_ELEMENTS // blocksize)
    for first in range(0, nblocks, per_chunk):
        last = min(nblocks, first + per_chunk)
        lo, hi = first * blocksize, min(n, last * blocksize)  # lo is even: blocksize is even
        blocks = split_blocks(flat[lo:hi], blocksize)
        absmax[first:last] = block_absmax(blocks)
        prescale, recip = reciprocal_scale(absmax[first:last])
        xn = scale_blocks(blocks, prescale, recip)
        codes = encode(xn, blocks, quant_type).ravel()[: hi - lo]
        packed[lo // 2: lo // 2 + (hi - lo + 1) // 2] = pack_nibbles(codes, quant_type)
    return packed, absmax


def decode(codes: np.ndarray, absmax: np.ndarray, blocksize: int, quant_type: str) -> np.ndarray:
    """Dequantize codes: out[i] = RN(table[code_i] * absmax[i // blocksize]) in float32 (one
    multiply, docs/format.md §8). Conversion to fp16/bf16 happens afterwards (round to nearest
    even)."""
    table = codebook(quant_type)
    scale = np.repeat(np.asarray(absmax, dtype=F32), blocksize)[: codes.size]
    return (table[codes] * scale).astype(F32)
