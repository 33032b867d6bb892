"""GGUF's 4-bit block types Q4_0, Q4_1 (quantize and dequantize), Q4_K and IQ4_NL (dequantize):
the NumPy specification, byte for byte as the gguf package (``gguf/quants.py``, classes
``Q4_0`` / ``Q4_1`` / ``Q4_K`` / ``IQ4_NL``), which follows ggml's ``quantize_row_q4_0_ref`` /
``quantize_row_q4_1_ref`` / ``dequantize_row_*`` in ``ggml-quants.c``.

Blocks run along each row (the last dimension must be a multiple of the block). Every block is
self-contained bytes, scales first, then the codes; in every group of 32 values byte j holds
value j in its low nibble and value j + 16 in its high nibble. fp16 means IEEE binary16,
round to nearest even (NumPy ``astype(float16)``; beyond 65504 it would be inf, which q4lab
refuses: see ``check_fp16``). Every rounding rule:

Q4_0 (18 bytes per 32 values: fp16 d, 16 bytes of codes):
  m = the element of largest magnitude, with its sign (the first one on a tie);
  d = RN(m / -8) in float32; id = 0 if d == 0 else RN(1 / d);
  q = min(15, u8(trunc(RN(RN(x * id) + 8.5)))) (float32, two roundings, never an FMA), where
  u8 is x86's float -> int32 -> low byte conversion that NumPy's ``astype(np.uint8)`` performs
  (a non-finite or out-of-range value gives 0, -1 gives 255). It only matters when 1 / d
  overflows or loses precision (|m| < 2^-122); fp16(d) is then 0 and the block decodes to 0.
  stored d = fp16(d). The codes were chosen with the float32 d, decoding uses the fp16 d.
  Dequantize: RN(fp16 d * (q - 8)) in float32.
Q4_1 (20 bytes: fp16 d, fp16 min, 16 bytes of codes):
  lo, hi = min, max of the block; d = RN(RN(hi - lo) / 15); id = 0 if d == 0 else RN(1 / d);
  q = min(15, u8(trunc(RN(RN(RN(x - lo) * id) + 0.5)))); stored fp16(d), fp16(lo).
  Which zero is the min (or max) of a block holding both +0.0 and -0.0 is decided by the order
  of NumPy's AVX2 reduction (``simd_reduce_c_min_f32``): see ``block_min_max``.
  Dequantize: RN(RN(d * q) + lo) in float32 (fp16 d and lo, two roundings).
Q4_K (144 bytes per 256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc_i and mins m_i
  for the eight 32-value sub-blocks, 128 bytes of codes; each 64-value pair of sub-blocks shares
  32 bytes, sub-block 2k in the low nibbles and 2k + 1 in the high ones):
  Dequantize: RN(RN(d * sc_i) * q) - RN(dmin * m_i), float32 (three roundings and a subtract).
IQ4_NL (18 bytes per 32: fp16 d, 16 bytes of codes):
  Dequantize: RN(d * KVALUES[q]) with the non-uniform int8 table KVALUES.
"""
from __future__ import annotations

import numpy as np

F16, F32, U8 = np.float16, np.float32, np.uint8
GROUP = 32  # values per nibble-paired group
QK_K = 256  # values per Q4_K super-block
K_SCALE_SIZE = 12
#: IQ4_NL's table (ggml ``kvalues_iq4nl``).
IQ4_NL_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FP16_MAX = 65504.0
FP16_OVERFLOW = 65520.0  # the midpoint of 65504 and 2^16: from here fp16 rounds to inf
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q4_k": 144, "iq4_nl": 18}
BLOCK_VALUES = {"q4_0": 32, "q4_1": 32, "q4_k": 256, "iq4_nl": 32}


def codebook(quant_type: str) -> np.ndarray:
    """The 16 values a code stands for before scaling (q - 8, q, q, KVALUES[q]), float32."""
    q = np.arange(16, dtype=F32)
    tables = {"q4_0": q - 8, "q4_1": q, "q4_k": q, "iq4_nl": np.array(IQ4_NL_KVALUES, F32)}
    return tables[quant_type].astype(F32)


def pack_pairs(codes: np.ndarray) -> np.ndarray:
    """(nblocks, 32) codes -> (nblocks, 16) bytes: byte j = code j | code (j + 16) << 4."""
    codes = np.asarray(codes, dtype=U8)
    return (codes[:, :GROUP // 2] | (codes[:, GROUP // 2:] << 4)).astype(U8)


def unpack_pairs(qs: np.ndarray) -> np.ndarray:
    """(nblocks, 16 * g) bytes -> (nblocks, 32 * g) codes, group by group."""
    qs = np.asarray(qs, dtype=U8)
    n = qs.shape[0]
    groups = qs.reshape(n, -1, GROUP // 2)
    return np.concatenate([groups & 0x0F, groups >> 4], axis=-1).reshape(n, -1).astype(U8)


def check_fp16(values: np.ndarray, what: str, quant_type: str) -> None:
    """A scale beyond fp16's range would be stored as inf (NumPy and ggml do); refuse it."""
    big = np.abs(values) >= F32(FP16_OVERFLOW)
    if big.any():
        b = int(np.argmax(big))
        raise ValueError(f"{quant_type} block {b}: {what} = {float(values[b]):.6g} exceeds fp16's "
                         f"range (65504), so GGUF would store inf; scale the tensor down first")


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=F32).astype(F16).reshape(-1, 1).view(U8)


def _fp16(blocks: np.ndarray, first: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, first:first + 2]).view(F16).astype(F32).reshape(-1)


def u8_code(v: np.ndarray) -> np.ndarray:
    """min(15, low byte of int32(trunc(v))), 0 for non-finite or out-of-int32-range v (the x86
    conversion behind NumPy's ``astype(np.uint8)`` in gguf-py)."""
    t = np.trunc(np.asarray(v, dtype=F32))
    ok = np.isfinite(t) & (t >= F32(-2.0**31)) & (t < F32(2.0**31))
    low = np.where(ok, t, F32(0)).astype(np.int64) & 0xFF
    return np.minimum(low, 15).astype(U8)


def _lanes_op(a, b, want_max: bool):
    """_mm256_min_ps / max_ps: a if a < b (a > b) else b, so on equality (+0 vs -0) b wins."""
    return np.where(a > b, a, b) if want_max else np.where(a < b, a, b)


def block_min_max(blocks: np.ndarray, want_max: bool) -> np.ndarray:
    """The min (or max) of each 32-value block in NumPy's AVX2 reduction order, which fixes the
    sign of a zero result: acc = 8 copies of x0; acc = op(acc, x[1 + 8k : 9 + 8k]) for k = 0..2;
    a tree over lanes (4 | 4, then 2 | 2, then 1 | 1); then x[25..31] one by one; every op keeps
    its first operand only when strictly smaller (larger). Equals ``blocks.min(axis=1)`` on
    AVX2 machines for every input (``tests/test_formats_landscape.py``)."""
    x = np.asarray(blocks, dtype=F32)
    acc = np.repeat(x[:, :1], 8, axis=1)
    for k in range(3):
        acc = _lanes_op(acc, x[:, 1 + 8 * k: 9 + 8 * k], want_max)
    acc = _lanes_op(acc[:, :4], acc[:, 4:], want_max)
    acc = _lanes_op(acc[:, :2], acc[:, 2:], want_max)
    result = _lanes_op(acc[:, 0], acc[:, 1], want_max)
    for i in range(25, 32):
        result = _lanes_op(result, x[:, i], want_max)
    return result.astype(F32)


def q4_0_quantize(blocks: np.ndarray) -> np.ndarray:
    """(nblocks, 32) float32 -> (nblocks, 18) uint8 Q4_0 blocks."""
    blocks = np.asarray(blocks, dtype=F32)
    idx = np.abs(blocks).argmax(axis=1)
    signed_max = blocks[np.arange(blocks.shape[0]), idx]
    d = (signed_max / F32(-8)).astype(F32)
    check_fp16(d, "d = max / -8", "q4_0")
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
        scaled = ((blocks * inv[:, None]).astype(F32) + F32(8.5)).astype(F32)
    codes = u8_code(scaled)
    return np.concatenate([_fp16_bytes(d), pack_pairs(codes)], axis=1)


def q4_1_quantize(blocks: np.ndarray) -> np.ndarray:
    """(nblocks, 32) float32 -> (nblocks, 20) uint8 Q4_1 blocks."""
    blocks = np.asarray(blocks, dtype=F32)
    hi, lo = block_min_max(blocks, True), block_min_max(blocks, False)
    with np.errstate(over="ignore"):
        d = ((hi - lo).astype(F32) / F32(15)).astype(F32)
    check_fp16(d, "d = (max - min) / 15", "q4_1")
    check_fp16(lo, "min", "q4_1")
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
        shifted = (blocks - lo[:, None]).astype(F32)
        scaled = ((shifted * inv[:, None]).astype(F32) + F32(0.5)).astype(F32)
    codes = u8_code(scaled)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), pack_pairs(codes)], axis=1)


def q4_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=U8).reshape(-1, 18)
    codes = unpack_pairs(blocks[:, 2:]).astype(F32) - F32(8)
    return (_fp16(blocks, 0)[:, None] * codes).astype(F32)


def q4_1_dequantize(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=U8).reshape(-1, 20)
    codes = unpack_pairs(blocks[:, 4:]).astype(F32)
    d, m = _fp16(blocks, 0)[:, None], _fp16(blocks, 2)[:, None]
    return ((d * codes).astype(F32) + m).astype(F32)


def q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes -> eight 6-bit scales and eight 6-bit mins per super-block
    (ggml ``get_scale_min_k4``): bytes 0-3 low 6 bits = sc 0-3, bytes 4-7 = m 0-3; sc 4-7 =
    low nibble of bytes 8-11 | top 2 bits of bytes 0-3 << 4, m 4-7 = high nibble | bytes 4-7's."""
    s = np.asarray(scales, dtype=U8).reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(U8), mins.astype(U8)


def q4_k_dequantize(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=U8).reshape(-1, 144)
    n = blocks.shape[0]
    d, dmin = _fp16(blocks, 0)[:, None], _fp16(blocks, 2)[:, None]
    sc, mins = q4_k_scale_min(blocks[:, 4:4 + K_SCALE_SIZE])
    scale = (d * sc.astype(F32)).astype(F32)[:, :, None]
    offset = (dmin * mins.astype(F32)).astype(F32)[:, :, None]
    qs = blocks[:, 16:].reshape(n, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(F32)
    return ((scale * codes).astype(F32) - offset).astype(F32).reshape(n, QK_K)


def iq4_nl_dequantize(blocks: np.ndarray) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=U8).reshape(-1, 18)
    values = codebook("iq4_nl")[unpack_pairs(blocks[:, 2:])]
    return (_fp16(blocks, 0)[:, None] * values).astype(F32)


QUANTIZE = {"q4_0": q4_0_quantize, "q4_1": q4_1_quantize}
DEQUANTIZE = {"q4_0": q4_0_dequantize, "q4_1": q4_1_dequantize, "q4_k": q4_k_dequantize,
              "iq4_nl": iq4_nl_dequantize}


def block_scales(blocks: np.ndarray, quant_type: str) -> np.ndarray:
    """The fp16 scale d of every block as float32 (for display and the quality lab)."""
    blocks = np.asarray(blocks, dtype=U8).reshape(-1, BLOCK_BYTES[quant_type])
    return _fp16(blocks, 0)
