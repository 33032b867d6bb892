"""``matmul_4bit``: y = x · Ŵᵀ (+ bias) straight from packed 4-bit codes, the executable
specification.

Source: the fused 4-bit GEMV of bitsandbytes (``functional.py::gemv_4bit``, ``kernels.cu::
kgemm_4bit_inference_naive``) computes the same product without materialising Ŵ, but leaves its
summation order to the hardware (warp shuffles, fast-math). q4lab writes the order down, so that the
C++ kernels (``csrc/q4_matmul_cpu.cpp``: portable, AVX2, AVX-512) and the CUDA kernel
(``csrc/q4_matmul_cuda.cu``) give the same bytes for any thread count. ``docs/format.md`` ("Fused
matmul") states the same rules in prose.

The weight Ŵ has shape (N, K) = ``state.shape`` and is stored as in ``quantize_4bit``: flattened
row-major, element ``e = o*K + k`` of row ``o``, blocks of ``B = state.blocksize`` over the flat
index, elements ``2j`` and ``2j+1`` in byte ``j``. For each row ``x`` of the input (``x`` of shape
(..., K), converted to float32 exactly), summation order **pair-chain-v2** (``MATMUL_ORDER``):

1. product:  ``p[e] = RN(table[code[e]] * x[k])``: one float32 multiply per weight, the codebook
   value times the input; the block's absmax is not applied yet.
2. segments: a segment is a maximal run of flat indices in one row AND one block. A block that
   straddles two rows (K % B != 0) gives one segment in each.
3. terms:    inside a segment, the two elements of one byte (flat indices 2j, 2j+1) form a pair,
   term ``q = RN(p[2j] + p[2j+1])``; an element whose byte partner lies outside the segment (only
   at a row boundary of an odd K: block boundaries are even) is a term ``q = p[e]`` alone.
4. segment sum: ``s = +0.0``, then ``s = RN(s + q)`` for the segment's terms in increasing ``e``:
   one chain per row and block.
5. row sum:  ``acc = +0.0``, then, for the row's segments in increasing ``e``,
   ``acc = RN(acc + RN(absmax[block] * s))`` (absmax decoded to float32 first, as in
   ``dequantize_4bit``: ``state_absmax``); ``y[o] = acc``.
6. bias:     ``y[o] = RN(y[o] + float32(bias[o]))`` when a bias is given.
7. output:   float32, or rounded to nearest even to float16 / bfloat16 (x's dtype in the torch
   front end).

Every operation is one IEEE-754 float32 operation rounded to nearest even: no FMA, no reassociation.
``s`` and ``acc`` start at +0.0 and so can never be -0.0; a kernel may start ``s`` with its first
term instead (the sums differ at most in the sign of a zero ``s``, and ``acc + RN(absmax * ±0)``
is the same ``acc``). The result is close to, but not the same bytes as, ``x @
dequantize_4bit(...).T``: there the absmax multiplies each weight before the product, here once per
segment.

Why this order (it replaced **lanes-v1**, 32 interleaved lane sums per segment and a lane tree):
every output row is one chain per block, so a kernel can vectorize across output rows (one
register of rows shares x and its 16 products, CUDA threads own rows) or, one row at a time, look a
whole byte up in a 256-entry table of pair terms ``RN(RN(t[hi]*x[2j]) + RN(t[lo]*x[2j+1]))`` built
once per call: one load and one add per two weights, the AVX2 form of ``csrc/q4_matmul_cpu.cpp``.
Non-finite inputs are not checked: NaN and Inf propagate as IEEE arithmetic says (NaN bit patterns
are unspecified).
"""
from __future__ import annotations

import numpy as np

from .api import _dtype_name, check_statistics, round_to_bfloat16, state_absmax
from .blockwise import unpack_nibbles
from .codebooks import codebook

F32 = np.float32
#: The name of the summation order this module specifies (docs/format.md, "Fused matmul").
MATMUL_ORDER = "pair-chain-v2"


def segments(n_rows: int, k: int, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 2. The (start, end) flat indices of every segment, in increasing order: the flat range
    [0, N*K) cut at every multiple of K (row ends) and of B (block ends)."""
    n = n_rows * k
    cuts = np.union1d(np.arange(0, n, k, dtype=np.int64),
                      np.arange(0, n, blocksize, dtype=np.int64))
    return cuts, np.append(cuts[1:], n)


def segment_sums(products: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Steps 3-4. One float32 sum per segment: its terms (byte pairs, a lone element at an odd
    start or end) added in increasing flat index. Step t of the loop adds every segment's term t,
    or +0.0 where the segment has fewer terms (``s + 0.0 == s`` since ``s`` is never -0.0)."""
    lead = starts & 1                               # a lone first element (odd start)
    pair_begin = starts + lead
    npairs = (ends - pair_begin) // 2
    tail = (ends - pair_begin) & 1                  # a lone last element
    nterms = lead + npairs + tail
    s = np.zeros(starts.size, dtype=F32)
    padded = np.append(products, F32(0.0))          # index n reads +0.0
    n = products.size
    for t in range(int(nterms.max()) if starts.size else 0):
        first = np.where(lead == 1, np.where(t == 0, starts, pair_begin + 2 * (t - 1)),
                         pair_begin + 2 * t)
        is_pair = (t >= lead) & (t < lead + npairs)
        alive = t < nterms
        a = padded[np.where(alive, first, n)]
        b = padded[np.where(alive & is_pair, first + 1, n)]
        term = np.where(is_pair, a + b, a)          # RN(p[2j] + p[2j+1]), or p[e] alone
        s = s + np.where(alive, term, F32(0.0))
    return s


def row_sums(scaled: np.ndarray, starts: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """Step 5. (N,): per row, the scaled segment sums added in increasing flat index."""
    row = starts // k
    first = np.searchsorted(row, np.arange(n_rows))          # first segment of each row
    count = np.bincount(row, minlength=n_rows)
    acc = np.zeros(n_rows, dtype=F32)
    for j in range(int(count.max())):
        rows = np.nonzero(count > j)[0]
        acc[rows] = acc[rows] + scaled[first[rows] + j]
    return acc


def _as_rows(x, k: int) -> tuple[np.ndarray, tuple]:
    """x of shape (..., K) as float32 rows (M, K), and its leading shape."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.dtype.name not in ("float32", "float16"):
        raise TypeError(f"x has dtype {x.dtype}; matmul_4bit takes float32 or float16 arrays "
                        f"(bfloat16 values as float32)")
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {x.shape} but the weight has K={k} columns: the last "
                         f"dimension of x must be {k}")
    return np.ascontiguousarray(x, dtype=F32).reshape(-1, k), x.shape[:-1]


def matmul_4bit(x, packed, state, bias=None, dtype: str = "float32") -> np.ndarray:
    """y = x · Ŵᵀ (+ bias) for a 2-D quantized weight Ŵ (N, K), by steps 1-7 of the module
    docstring. ``x`` has shape (..., K); returns (..., N) float32 (default), or rounded to nearest
    even: ``dtype='float16'`` as float16, ``'bfloat16'`` as float32 holding bf16 values."""
    state = state.numpy()
    state.validate(packed)
    check_statistics(state)
    if len(state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D weight state, got shape {tuple(state.shape)}")
    n_rows, k = (int(d) for d in state.shape)
    dtype = _dtype_name(dtype)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise TypeError(f"dtype={dtype!r} is not float32, float16 or bfloat16")
    rows, lead = _as_rows(x, k)
    if bias is not None:
        if type(bias).__module__.startswith("torch"):
            bias = bias.detach().cpu().float().numpy()
        bias = np.asarray(bias, dtype=F32).reshape(-1)
        if bias.size != n_rows:
            raise ValueError(f"bias has {bias.size} values but the weight has {n_rows} rows")
    values = codebook(state.quant_type)[unpack_nibbles(packed, state.numel)]   # table[code[e]]
    absmax = state_absmax(state)
    starts, ends = segments(n_rows, k, state.blocksize)
    out = np.empty((rows.shape[0], n_rows), dtype=F32)
    for m, xm in enumerate(rows):
        products = values * np.tile(xm, n_rows)                                  # step 1
        s = segment_sums(products, starts, ends)                                 # steps 2-4
        scaled = absmax[starts // state.blocksize] * s                           # step 5
        y = row_sums(scaled, starts, n_rows, k)                                  # step 5
        out[m] = y if bias is None else y + bias                                 # step 6
    out = out.reshape(*lead, n_rows)
    if dtype == "float16":
        return out.astype(np.float16)
    if dtype == "bfloat16":
        return round_to_bfloat16(out)
    return out
