"""Codebooks and decision thresholds of q4lab's 4-bit and 8-bit formats (NumPy + SciPy only).

Sources:
- NF4: QLoRA (Dettmers et al. 2023, arXiv 2305.14314) §3 "4-bit NormalFloat", as shipped by
  bitsandbytes ``functional.py::create_normal_map(offset=0.9677083, use_extra_value=True)``.
- FP4: bitsandbytes ``functional.py::get_4bit_type("fp4")`` (index order = bit pattern).
- Dynamic 8-bit map: bitsandbytes ``functional.py::create_dynamic_map(signed=True, 7, 8)``.
- Thresholds: q4lab's own rule (docs/format.md, table T5): float32 round-to-nearest of the exact
  midpoint.

Every table here is *derived* at call time from its recipe and checked bit for bit against the
published hex tables in ``tests/test_codebooks.py``.

Why not the seed-style "2^k + 1 quantiles, then midpoints" recipe?  The QLoRA paper describes NF4 as
the midpoints of 2^k + 1 equal-probability quantiles of N(0, 1). That recipe is symmetric and has no
exact zero. What bitsandbytes ships (and every NF4 checkpoint uses) is different: it takes 8
quantile levels for the positive half and 7 for the negative half, both spaced linearly from
``offset`` down to 0.5 (dropping 0.5 itself), applies the normal ppf, adds an exact 0 and normalizes
by the largest value, so that both ±1 are present, 0 is exact, and there are 8 positive and 7
negative levels. Only this asymmetric recipe reproduces the 16 published float32 values; q4lab
follows it.
"""
from __future__ import annotations

from fractions import Fraction
from functools import cache

import numpy as np
from scipy.stats import norm

from ..constants import DYNAMIC_CODES, QUANT_TYPES, ZERO_CODES

F32 = np.float32

#: The offset bitsandbytes uses for NF4: about ((1 - 1/30) + (1 - 1/32)) / 2.
NF4_OFFSET = 0.9677083


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` reproduced bit for bit on the CPU.

    torch computes ``step = f32(f32(end) - f32(start)) / (steps - 1)`` in float32, then element i is
    ``start + step * i`` for i < steps // 2 and ``end - step * (steps - 1 - i)`` otherwise, each
    rounded ONCE to float32 (the kernel is compiled with FMA contraction, so ``step * i`` is not
    rounded separately). The exact value of each expression fits in a float64, so computing it in
    float64 and rounding once to float32 is exact. Checked against torch for every size used here.
    """
    s, e = F32(start), F32(end)
    step = F32(F32(e - s) / F32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lower = np.float64(s) + np.float64(step) * i
    upper = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, lower, upper).astype(F32)


def nf4_derivation(offset: float = NF4_OFFSET) -> dict:
    """The NF4 recipe step by step for a given ``offset`` (the probability of the largest level).

    p_pos = linspace_f32(offset, 0.5, 9)[:-1] (8 levels), p_neg = linspace_f32(offset, 0.5, 8)[:-1]
    (7 levels); z = norm.ppf(p) in float64 on those float32 levels; the 15 values and an exact 0 as
    float32, sorted; divided (float32) by the largest. bitsandbytes pads with 241 zeros to 256 and
    keeps ``[:8] + [-8:]``, which selects exactly these 16. Returns every intermediate array plus
    ``levels`` (16 float32, ascending); at ``NF4_OFFSET`` the levels are the shipped NF4 table."""
    offset = float(offset)
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset={offset} must lie strictly between 0.5 and 1 (a probability "
                         f"above the median, below 1 where norm.ppf is infinite)")
    p_pos = torch_linspace_f32(offset, 0.5, 9)[:-1]
    p_neg = torch_linspace_f32(offset, 0.5, 8)[:-1]
    z_pos = norm.ppf(p_pos.astype(np.float64))
    z_neg = -norm.ppf(p_neg.astype(np.float64))
    raw = np.sort(np.concatenate([z_pos, z_neg, [0.0]]).astype(F32))
    scale = raw.max()
    levels = (raw / scale).astype(F32)
    return {"offset": offset, "p_pos": p_pos, "p_neg": p_neg, "z_pos": z_pos, "z_neg": z_neg,
            "raw": raw, "scale": F32(scale), "levels": levels}


@cache
def _nf4() -> np.ndarray:
    table = nf4_derivation(NF4_OFFSET)["levels"]  # 7 negatives, the 0, 8 positives
    table.setflags(write=False)
    return table


def nf4_codebook() -> np.ndarray:
    """The 16 NF4 levels, float32, ascending; index = 4-bit code.

    Derived at call time (cached) by :func:`nf4_derivation` at ``offset=0.9677083``: 8 positive and
    7 negative normal quantiles in torch's float32 linspace, ``norm.ppf`` in float64, an exact 0,
    float32, sorted and divided (float32) by the largest; code 7 is exactly 0.0, codes 0 and 15 are
    ∓1.0.
    """
    return _nf4().copy()


def fp4_codebook() -> np.ndarray:
    """The 16 FP4 levels, float32, in bitsandbytes' bit order (not sorted).

    Bit 3 is the sign; the low 3 bits index magnitudes ``[0, 0.0625, 8, 12, 4, 6, 2, 3] / 12``
    (float32 division by 12). Index 8 is +0.0 (bnb's literal ``-0`` is the Python int 0), so
    dequantizing code 8 gives +0.0.
    """
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    data = np.array(magnitudes + [0.0] + [-m for m in magnitudes[1:]], dtype=F32)
    return (data / F32(12.0)).astype(F32)


def int4_codebook() -> np.ndarray:
    """Uniform symmetric INT4 for comparison only: 15 evenly spaced levels k/7, k = -7..7, plus a
    duplicate +1.0 at code 15 so the table has 16 entries and ±1 both exist (absmax scaling, same
    thresholds rule). Not a bitsandbytes format; used to show what NF4 buys over a uniform grid."""
    levels = np.arange(-7, 8, dtype=np.float64) / 7.0
    return np.concatenate([levels, [1.0]]).astype(F32)


@cache
def _dynamic() -> np.ndarray:
    data = []
    for i in range(7):  # max_exponent_bits = 7, signed: 2^i fraction items in decade i
        bounds = torch_linspace_f32(0.1, 1.0, 2**i + 1)
        means = ((bounds[:-1] + bounds[1:]) / F32(2.0)).astype(F32)
        scale = F32(10.0 ** (i - 6))
        data.append((scale * means).astype(F32))
        data.append((-scale * means).astype(F32))
    data.append(np.array([0.0, 1.0], dtype=F32))
    table = np.sort(np.concatenate(data)).astype(F32)
    assert table.size == DYNAMIC_CODES
    table.setflags(write=False)
    return table


def dynamic_map() -> np.ndarray:
    """bitsandbytes' 256-entry signed dynamic 8-bit map (float32, ascending), used to compress the
    per-block absmax in double quantization. Derived like ``create_dynamic_map(True, 7, 8)``: for
    decade i = 0..6, the float32 means of neighbouring points of ``linspace(0.1, 1, 2^i + 1)`` times
    ``f32(10^(i-6))`` (float32 multiply), both signs; plus 0.0 and 1.0. It is asymmetric: there is
    +1.0 but no -1.0 (code 0 is -0.99296874), code 127 is 0.0."""
    return _dynamic().copy()


def exact_midpoint_f32(a: np.float32, b: np.float32) -> np.float32:
    """float32 round-to-nearest-even of the exact midpoint (a + b) / 2 (one rounding)."""
    exact = (Fraction(float(a)) + Fraction(float(b))) / 2
    as_double = float(exact)
    assert Fraction(as_double) == exact, "midpoint of two float32 must be exact in float64"
    return F32(as_double)


def midpoint_thresholds(sorted_levels: np.ndarray) -> np.ndarray:
    """Thresholds t_k = RN_f32((v_k + v_{k+1}) / 2) between neighbouring sorted levels (float32)."""
    v = np.asarray(sorted_levels, dtype=F32)
    return np.array([exact_midpoint_f32(v[k], v[k + 1]) for k in range(v.size - 1)], dtype=F32)


@cache
def _thresholds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    if quant_type == "nf4":
        return midpoint_thresholds(_nf4()), np.arange(16, dtype=np.uint8)
    if quant_type == "fp4":
        magnitudes = fp4_codebook()[:8]
        order = np.argsort(magnitudes, kind="stable").astype(np.uint8)  # [0,1,6,7,4,5,2,3]
        return midpoint_thresholds(magnitudes[order]), order
    if quant_type == "int4":
        return midpoint_thresholds(int4_codebook()[:15]), np.arange(15, dtype=np.uint8)
    if quant_type == "dynamic":
        return midpoint_thresholds(_dynamic()), np.arange(DYNAMIC_CODES, dtype=np.uint8)
    raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")


def thresholds(quant_type: str) -> np.ndarray:
    """Decision thresholds (float32, ascending) for ``quant_type``.

    nf4: 15 thresholds over the 16 codes; code = #{k : t_k < xn} (a tie goes to the lower code).
    fp4: 7 thresholds over the 8 magnitudes sorted ascending; see :func:`fp4_magnitude_order`.
    int4: 14 thresholds over the 15 distinct levels (code 15 is never produced).
    dynamic: 255 thresholds over the 256-entry dynamic map (ties go to the even index, see
    ``double_quant.encode_dynamic``).
    """
    return _thresholds(quant_type)[0].copy()


def fp4_magnitude_order() -> np.ndarray:
    """FP4 magnitude codes sorted by magnitude: ``[0b000, 0b001, 0b110, 0b111, 0b100, 0b101,
    0b010, 0b011]``; entry c is the 3-bit code of the c-th smallest magnitude."""
    return _thresholds("fp4")[1].copy()


def codebook(quant_type: str) -> np.ndarray:
    """The 16-entry table for ``quant_type`` (one of ``constants.QUANT_TYPES``)."""
    tables = {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    return tables[quant_type]()


def zero_code(quant_type: str) -> int:
    """The code that represents 0.0 (``constants.ZERO_CODES``: NF4 0b0111, FP4 0b0000, INT4
    0b0111); ``codebook(quant_type)[zero_code(quant_type)]`` is 0.0 (tests/test_codebooks.py)."""
    if quant_type not in ZERO_CODES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    return ZERO_CODES[quant_type]
