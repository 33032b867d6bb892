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
index. For each row ``x`` of the input (``x`` of shape (..., K), converted to float32 exactly):

1. product:  ``p[e] = RN(table[code[e]] * x[k])``: one float32 multiply per weight, the codebook
   value times the input; the block's absmax is not applied yet.
2. lanes:    element ``e`` belongs to lane ``l = e mod 32``.  (32 lanes = one CUDA warp = two
   AVX-512 or four AVX2 registers; lanes are why the kernels can be vectorised.)
3. segments: a segment is a maximal run of flat indices in one row AND one block. A block that
   straddles two rows (K % B != 0) gives one segment in each.
4. segment sums: per segment and lane, ``s = +0.0`` then ``s = RN(s + p[e])`` for the lane's
   elements in increasing ``e``.
5. scaling:  per row and lane, ``acc = +0.0`` then, for the row's segments in increasing ``e``,
   ``acc = RN(acc + RN(absmax[block] * s))`` (absmax decoded to float32 first, as in
   ``dequantize_4bit``: ``state_absmax``).
6. lane tree: for w = 16, 8, 4, 2, 1: ``acc[l] = RN(acc[l] + acc[l + w])`` for l < w;
   ``y[o] = acc[0]``.
7. bias:     ``y[o] = RN(y[o] + float32(bias[o]))`` when a bias is given.
8. output:   float32, or rounded to nearest even to float16 / bfloat16 (x's dtype in the torch
   front end).

Every operation is one IEEE-754 float32 operation rounded to nearest even: no FMA, no reassociation.
A lane with no element in a segment adds ``RN(absmax * +0.0) = +0.0``, which changes nothing (``s``
and ``acc`` start at +0.0 and so can never be -0.0). The result is close to, but not the same bytes
as, ``x @ dequantize_4bit(...).T``: there the absmax multiplies each weight before the product, here
once per block and lane. Non-finite inputs are not checked: NaN and Inf propagate as IEEE arithmetic
says (NaN bit patterns are unspecified).
"""
from __future__ import annotations

import numpy as np

from .api import _dtype_name, check_statistics, round_to_bfloat16, state_absmax
from .blockwise import unpack_nibbles
from .codebooks import codebook

F32 = np.float32
LANES = 32
#: The lane tree of step 6: widths of the pairwise additions, in order.
TREE_WIDTHS = (16, 8, 4, 2, 1)


def segments(n_rows: int, k: int, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 3. The (start, end) flat indices of every segment, in increasing order: the flat range
    [0, N*K) cut at every multiple of K (row ends) and of B (block ends)."""
    n = n_rows * k
    cuts = np.union1d(np.arange(0, n, k, dtype=np.int64),
                      np.arange(0, n, blocksize, dtype=np.int64))
    return cuts, np.append(cuts[1:], n)


def segment_lane_sums(products: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                      blocksize: int) -> np.ndarray:
    """Step 4. (nsegments, 32) float32 sums, each lane summed in increasing flat index.

    A segment lies inside one block, and a block is ``B/32`` chunks of 32 consecutive flat indices
    (lane 0 to 31), so step t of the loop adds the segment's element of chunk t in every lane, or
    +0.0 where that element lies outside the segment."""
    n = products.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, dtype=F32)
    padded[:n] = products
    chunks = padded.reshape(nblocks, blocksize // LANES, LANES)
    block = starts // blocksize
    flat = block[:, None] * blocksize + np.arange(LANES)[None, :]   # chunk 0's flat index per lane
    s = np.zeros((starts.size, LANES), dtype=F32)
    for t in range(blocksize // LANES):
        e = flat + t * LANES
        inside = (e >= starts[:, None]) & (e < ends[:, None])
        s = s + np.where(inside, chunks[block, t, :], F32(0.0))
    return s


def row_lane_sums(scaled: np.ndarray, starts: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """Step 5. (N, 32): per row, the scaled segment sums added in increasing flat index."""
    row = starts // k
    first = np.searchsorted(row, np.arange(n_rows))          # first segment of each row
    count = np.bincount(row, minlength=n_rows)
    acc = np.zeros((n_rows, LANES), dtype=F32)
    for j in range(int(count.max())):
        rows = np.nonzero(count > j)[0]
        acc[rows] = acc[rows] + scaled[first[rows] + j]
    return acc


def lane_tree(acc: np.ndarray) -> np.ndarray:
    """Step 6. Pairwise lane additions of width 16, 8, 4, 2, 1; returns lane 0."""
    acc = np.array(acc, dtype=F32)
    for w in TREE_WIDTHS:
        acc[..., :w] = acc[..., :w] + acc[..., w:2 * w]
    return acc[..., 0]


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
    """y = x · Ŵᵀ (+ bias) for a 2-D quantized weight Ŵ (N, K), by steps 1-8 of the module
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
        s = segment_lane_sums(products, starts, ends, state.blocksize)          # steps 2-4
        scaled = absmax[starts // state.blocksize][:, None] * s                 # step 5
        y = lane_tree(row_lane_sums(scaled, starts, n_rows, k))                 # steps 5-6
        out[m] = y if bias is None else y + bias                                # step 7
    out = out.reshape(*lead, n_rows)
    if dtype == "float16":
        return out.astype(np.float16)
    if dtype == "bfloat16":
        return round_to_bfloat16(out)
    return out
