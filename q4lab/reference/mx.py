"""MXFP4 and NVFP4: E2M1 elements with a per-block scale, the NumPy specification.

Sources: OCP Microscaling Formats (MX) Specification v1.0 (2023) §5.3.3 (FP4 E2M1), §5.4
(E8M0 scale), §6.3 (the scale X = 2^(floor(log2(amax)) - emax_elem), emax_elem = 2 for E2M1);
NVIDIA's NVFP4 (Blackwell, "NVFP4" in the CUDA 12.8 PTX ISA and the Transformer Engine recipe):
E2M1 elements, an E4M3 scale per 16 values and a float32 scale per tensor. Byte for byte as
torchao ``prototype/mx_formats``: ``mx_tensor.py::to_mx(x, torch.float4_e2m1fn_x2, 32)``
(FLOOR mode) and ``nvfp4_tensor.py::nvfp4_quantize``; dequantization as ``to_dtype`` and
``NVFP4Tensor.dequantize``. Every rounding rule:

E2M1 (both formats). Codes 0..7 are +{0, 0.5, 1, 1.5, 2, 3, 4, 6}, bit 3 is the sign (copied
from the float32 sign bit, so -0.0 and a negative value that rounds to 0 get code 8). A scaled
float32 value v is rounded to the nearest magnitude, ties to the even code (0.25 -> 0,
0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); |v| >= 6 saturates to 6.

MXFP4, per block of 32 consecutive values of a row (the last dimension a multiple of 32):
1. amax = max |x| (float32).
2. e = the biased exponent field of amax minus 127 (a subnormal or zero amax gives -127, which
   equals floor(log2(amax)) after step 3's clamp); the scale exponent is e - 2 (2 = E2M1's
   largest exponent), clamped to [-127, 127]; stored biased as E8M0 code = e - 2 + 127.
3. The divisor is 2^(code - 127) as float32, except code 0 divides by 2^-126 (torchao clamps the
   divisor to the smallest normal float32; OCP would divide by 2^-127: only blocks with
   amax < 2^-124 are affected, their values decode at half size, docs/formats.md).
4. v = RN(x / divisor) (float32 division, exact unless v is subnormal), then E2M1 above.
Dequantization: value(code) * 2^(E8M0 - 127) in float32 (E8M0 255 is NaN).

NVFP4, per block of 16 consecutive values of a row, with an optional float32 tensor scale g:
1. amax = max |x|; s = RN(amax / 6) (float32 division).
2. without g: s8 = E4M3(clamp(s, 2^-6, 448)); r = RN(1 / float(s8)).
   with g:    s8 = E4M3(clamp(RN(s / g), 2^-6, 448)); r = RN(RN(1 / g) / float(s8)).
   E4M3 is round to nearest, ties to even code; 2^-6 is E4M3's smallest normal, so a block
   scale is never subnormal and an all-zero block stores 2^-6.
3. v = clamp(RN(x * r), -6, 6), then E2M1 above.
Dequantization: value(code) * float(s8) without g, value(code) * RN(g * float(s8)) with g.
The usual g is ``tensor_scale_of(x)`` = RN(amax(x) / 2688) (torchao's
``per_tensor_amax_to_scale``; 2688 = 448 * 6), or 1.0 for an all-zero tensor.

Storage (torchao's): codes row-major, element 2j in the LOW nibble, 2j + 1 in the high nibble;
scales one uint8 per block (the E8M0 / E4M3 bit pattern), row-major.
"""
from __future__ import annotations

from functools import cache

import numpy as np

F32, F64, U8 = np.float32, np.float64, np.uint8

#: E2M1 magnitudes, codes 0..7 (OCP MX v1.0 Table 5).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX, E2M1_EMAX = 6.0, 2
E8M0_BIAS, E8M0_NAN = 127, 255
E4M3_MAX, E4M3_TINY = 448.0, 2.0 ** -6
NVFP4_TENSOR_DIVISOR = E4M3_MAX * E2M1_MAX  # 2688
SIGN_BIT = 0b1000


def e2m1_codebook() -> np.ndarray:
    """The 16 E2M1 values, float32, index = code (8..15: the negatives, 8 is -0.0)."""
    mags = np.array(E2M1_MAGNITUDES, dtype=F32)
    return np.concatenate([mags, -mags]).astype(F32)


@cache
def _e4m3_values() -> np.ndarray:
    """The 128 non-negative E4M3 (fn) bit patterns 0x00..0x7F as float32; 0x7F is NaN."""
    codes = np.arange(128)
    exponent, mantissa = codes >> 3, codes & 7
    normal = (1 + mantissa / 8.0) * 2.0 ** (exponent - 7.0)
    subnormal = mantissa / 8.0 * 2.0 ** -6
    values = np.where(exponent == 0, subnormal, normal).astype(F32)
    values[0x7F] = np.nan
    values.setflags(write=False)
    return values


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 E4M3 (fn) bit patterns -> float32 (sign bit 0x80 honoured; 0x7F / 0xFF are NaN)."""
    codes = np.asarray(codes, dtype=U8)
    mags = _e4m3_values()[codes & 0x7F]
    return np.where(codes & 0x80, -mags, mags).astype(F32)


def round_to_grid(magnitudes: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of the ascending ``grid`` for each non-negative float32, ties
    to the even index (the midpoints of two float32 values are exact in float64)."""
    grid = np.asarray(grid, dtype=F64)
    mids = (grid[:-1] + grid[1:]) / 2
    m = np.asarray(magnitudes, dtype=F64)
    idx = np.searchsorted(mids, m, side="left")  # #{mid < m}: the lower neighbour on a tie
    on_tie = mids[np.minimum(idx, mids.size - 1)] == m
    return np.where(on_tie & (idx % 2 == 1), idx + 1, idx).astype(U8)


def e2m1_encode(v: np.ndarray) -> np.ndarray:
    """float32 -> E2M1 code (RN, ties to even code, saturating at 6; sign from the sign bit)."""
    v = np.asarray(v, dtype=F32)
    sign = (np.signbit(v).astype(U8) << 3).astype(U8)
    magnitude = np.minimum(np.abs(v), F32(E2M1_MAX))
    return (round_to_grid(magnitude, np.array(E2M1_MAGNITUDES)) | sign).astype(U8)


def e4m3_encode(v: np.ndarray) -> np.ndarray:
    """Non-negative float32 in [0, 448] -> E4M3 (fn) code, RN ties to even code; NaN -> 0x7F."""
    v = np.asarray(v, dtype=F32)
    codes = round_to_grid(np.where(np.isnan(v), F32(0), v), _e4m3_values()[:0x7F])
    return np.where(np.isnan(v), U8(0x7F), codes).astype(U8)


def pack_low_first(codes: np.ndarray) -> np.ndarray:
    """Two codes per byte, element 2j in the LOW nibble (torchao ``pack_uint4``); even count."""
    codes = np.asarray(codes, dtype=U8).reshape(-1)
    return (codes[0::2] | (codes[1::2] << 4)).astype(U8)


def unpack_low_first(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_low_first`."""
    packed = np.asarray(packed, dtype=U8).reshape(-1)
    codes = np.empty(packed.size * 2, dtype=U8)
    codes[0::2], codes[1::2] = packed & 0x0F, packed >> 4
    return codes


def e8m0_exponent(amax: np.ndarray) -> np.ndarray:
    """MXFP4 step 2: the E8M0 code of each block's amax (float32, finite, >= 0)."""
    field = (np.asarray(amax, dtype=F32).view(np.uint32) >> 23).astype(np.int64) & 0xFF
    unbiased = np.clip(field - E8M0_BIAS - E2M1_EMAX, -E8M0_BIAS, E8M0_BIAS)
    return (unbiased + E8M0_BIAS).astype(U8)


def e8m0_decode(codes: np.ndarray) -> np.ndarray:
    """E8M0 code -> 2^(code - 127) as float32 (code 0 is the subnormal 2^-127; 255 is NaN)."""
    codes = np.asarray(codes, dtype=U8)
    values = np.ldexp(F64(1.0), codes.astype(np.int64) - E8M0_BIAS).astype(F32)
    return np.where(codes == E8M0_NAN, F32(np.nan), values).astype(F32)


def mxfp4_quantize(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 steps 1-4 on (nblocks, 32) float32 blocks: (packed codes, E8M0 codes)."""
    blocks = np.asarray(blocks, dtype=F32)
    scales = e8m0_exponent(np.abs(blocks).max(axis=1))
    divisor = np.maximum(e8m0_decode(scales), F32(2.0 ** -126))  # torchao's clamp (step 3)
    codes = e2m1_encode((blocks / divisor[:, None]).astype(F32))
    return pack_low_first(codes), scales


def mxfp4_dequantize(packed: np.ndarray, scales: np.ndarray, blocksize: int = 32) -> np.ndarray:
    """value(code) * 2^(E8M0 - 127), float32, flat."""
    values = e2m1_codebook()[unpack_low_first(packed)]
    return (values * np.repeat(e8m0_decode(scales), blocksize)).astype(F32)


def tensor_scale_of(x: np.ndarray) -> np.float32:
    """NVFP4's usual per-tensor scale: RN(amax / 2688) in float32, 1.0 for an all-zero tensor
    (amax / 2688 = 0 would make every block scale 0 / 0)."""
    amax = F32(np.abs(np.asarray(x, dtype=F32)).max())
    return F32(1.0) if amax == 0 else F32(amax / F32(NVFP4_TENSOR_DIVISOR))


def nvfp4_quantize(blocks: np.ndarray, tensor_scale=None) -> tuple[np.ndarray, np.ndarray]:
    """NVFP4 steps 1-3 on (nblocks, 16) float32 blocks: (packed codes, E4M3 codes)."""
    blocks = np.asarray(blocks, dtype=F32)
    block_scale = (np.abs(blocks).max(axis=1) / F32(E2M1_MAX)).astype(F32)
    if tensor_scale is not None:
        g = F32(tensor_scale)
        block_scale = (block_scale / g).astype(F32)
    scale_codes = e4m3_encode(np.clip(block_scale, F32(E4M3_TINY), F32(E4M3_MAX)))
    stored = e4m3_decode(scale_codes)
    if tensor_scale is None:
        recip = (F32(1.0) / stored).astype(F32)
    else:
        recip = ((F32(1.0) / g) / stored).astype(F32)
    scaled = np.clip((blocks * recip[:, None]).astype(F32), F32(-E2M1_MAX), F32(E2M1_MAX))
    return pack_low_first(e2m1_encode(scaled)), scale_codes


def nvfp4_block_scales(scale_codes: np.ndarray, tensor_scale=None) -> np.ndarray:
    """The float32 scale each block decodes with: float(s8), or RN(g * float(s8))."""
    stored = e4m3_decode(scale_codes)
    if tensor_scale is None:
        return stored
    return (F32(tensor_scale) * stored).astype(F32)


def nvfp4_dequantize(packed: np.ndarray, scale_codes: np.ndarray, tensor_scale=None,
                     blocksize: int = 16) -> np.ndarray:
    """value(code) * block scale (see :func:`nvfp4_block_scales`), float32, flat."""
    values = e2m1_codebook()[unpack_low_first(packed)]
    scales = nvfp4_block_scales(scale_codes, tensor_scale)
    return (values * np.repeat(scales, blocksize)).astype(F32)
