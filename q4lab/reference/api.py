"""``quantize_4bit`` / ``dequantize_4bit`` on NumPy arrays: the executable specification.

Mirrors bitsandbytes ``functional.py::quantize_4bit`` / ``dequantize_4bit`` (same outputs, same
QuantState fields), with q4lab's exact rounding rules (docs/format.md; see ``blockwise`` and
``double_quant`` for each step). Input checks live here too, so every backend rejects the same
inputs with the same messages.
"""
from __future__ import annotations

import numpy as np

from ..constants import BLOCKSIZES, DTYPES, QUANT_TYPES
from ..state import QuantState, nested_state
from .blockwise import decode, quantize_blocks, unpack_nibbles
from .codebooks import codebook, dynamic_map
from .double_quant import dequantize_absmax, quantize_absmax

F32 = np.float32


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
            or int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; use one of {BLOCKSIZES}")
    return int(blocksize)


def check_quant_type(quant_type) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is unknown; use one of {QUANT_TYPES}")
    return quant_type


def check_offset(offset, double_quant: bool):
    """A given double-quant offset must be a finite float32 (None: computed as the exact mean)."""
    if offset is None:
        return None
    if not double_quant:
        raise ValueError("offset is only meaningful with double_quant=True")
    value = offset.item() if hasattr(offset, "item") else offset
    try:
        as_f32 = np.float32(value)
    except (TypeError, ValueError):
        raise TypeError(f"offset must be a number, got {type(offset).__name__}") from None
    if not np.isfinite(as_f32):
        raise ValueError(f"offset={value!r} is not a finite float32")
    return as_f32


def check_finite(flat: np.ndarray, blocksize: int) -> None:
    """NaN or Inf anywhere is an error naming the first bad block and element (format.md §9)."""
    bad = ~np.isfinite(flat)
    if bad.any():
        i = int(np.argmax(bad))
        kind = "NaN" if np.isnan(flat[i]) else "Inf"
        raise ValueError(
            f"input contains {kind} at flat index {i} (block {i // blocksize}); "
            f"4-bit quantization needs finite values"
        )


def check_statistics(state: QuantState) -> None:
    """The state's statistics must be numbers a quantizer could have written: absmax (plain or
    nested) finite and >= 0, the double-quant offset finite. Else ValueError naming the first bad
    block (docs/format.md §9: NaN or Inf is an error in every path), instead of NumPy's
    RuntimeWarning and NaN output."""
    parts = [("nested absmax", state.state2.absmax), ("offset", state.offset)] if state.nested \
        else [("absmax", state.absmax)]
    for what, values in parts:
        v = np.asarray(values, dtype=F32).reshape(-1)
        bad = ~np.isfinite(v) | ((v < 0) if what != "offset" else False)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"state {what} holds {float(v[i])!r} at index {i}: statistics must be "
                             f"finite{' and >= 0' if what != 'offset' else ''}; the state is "
                             f"corrupted, quantize the weight again")


def as_float32(x, dtype: str | None = None) -> tuple[np.ndarray, str]:
    """Flatten row-major and convert to float32 exactly. Accepts float32/float16 arrays (and
    ml_dtypes bfloat16). ``dtype`` overrides the recorded original dtype (the torch front end passes
    'bfloat16' for bf16 tensors it has already converted to float32 exactly)."""
    if type(x).__module__.startswith("torch"):  # a torch tensor: convert without importing torch
        name = str(x.dtype).replace("torch.", "")
        a, dtype = x.detach().cpu().float().numpy(), dtype or (name if name in DTYPES else None)
        if name not in DTYPES:
            raise TypeError(f"input dtype {x.dtype} is not supported; 4-bit quantization takes "
                            f"float32, float16 or bfloat16")
    a = np.asarray(x) if not type(x).__module__.startswith("torch") else a
    name = a.dtype.name
    if name not in DTYPES:
        raise TypeError(
            f"input dtype {a.dtype} is not supported; 4-bit quantization takes float32, float16 "
            f"or bfloat16 (convert float64 or integer data explicitly first)"
        )
    if dtype is not None and dtype not in DTYPES:
        raise TypeError(f"dtype={dtype!r} is not one of {DTYPES}")
    return np.ascontiguousarray(a, dtype=F32).reshape(-1), dtype or name


def quantize_4bit(x, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                  offset=None, dtype: str | None = None):
    """Quantize an array to packed 4-bit codes. Returns ``(packed, state)``.

    packed: uint8 (ceil(n/2),), element 2j in the high nibble. state: :class:`QuantState` with
    float32 absmax per block, or (double_quant) uint8 absmax codes + offset + nested state.
    ``offset`` (double quant only) replaces the computed exact mean, e.g. to reproduce the nested
    codes of a bitsandbytes checkpoint from its ``nested_offset``.
    """
    blocksize = check_blocksize(blocksize)
    check_quant_type(quant_type)
    offset = check_offset(offset, double_quant)
    shape = tuple(np.shape(x))
    flat, dtype = as_float32(x, dtype)
    if flat.size == 0:
        raise ValueError(f"cannot quantize an empty array (shape {shape})")
    check_finite(flat, blocksize)
    packed, absmax = quantize_blocks(flat, blocksize, quant_type)
    state = QuantState(shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                       code=codebook(quant_type), absmax=absmax)
    if double_quant:
        codes, absmax2, offset = quantize_absmax(absmax, offset)
        state.absmax, state.offset = codes, np.asarray(offset, dtype=F32)
        state.state2 = nested_state(absmax.size, absmax2, dynamic_map())
    return packed, state


def state_absmax(state: QuantState) -> np.ndarray:
    """The float32 absmax per block: stored as is, or decoded from the nested codes."""
    if state.nested:
        return dequantize_absmax(state.absmax, state.state2.absmax, state.offset)
    return np.asarray(state.absmax, dtype=F32)


def _dtype_name(dtype) -> str:
    """'float16', np.float16, np.dtype('float16') and torch.float16 all name 'float16'."""
    if isinstance(dtype, str) or type(dtype).__module__.startswith("torch"):
        return str(dtype).replace("torch.", "")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32 holding the bf16 values
    (NumPy has no bfloat16). Finite inputs only."""
    bits = np.asarray(values, dtype=F32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(F32)


def dequantize_4bit(packed, state: QuantState, dtype: str = "float32") -> np.ndarray:
    """Dequantize to an array of ``state.shape``.

    out = RN(table[code] * absmax) in float32 (the default, returned as is); with ``dtype`` =
    'float16' rounded to nearest even as a float16 array (magnitudes that round beyond 65504 become
    ±inf, as torch's ``.to(torch.float16)`` gives), with 'bfloat16' as a float32 array of the
    bf16 values (NumPy has no bfloat16). ``dtype=None`` means the state's original dtype.
    """
    state = state.numpy()
    state.validate(packed)
    check_statistics(state)
    dtype = _dtype_name(dtype or state.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"dtype={dtype!r} is not one of {DTYPES}")
    codes = unpack_nibbles(packed, state.numel)
    out = decode(codes, state_absmax(state), state.blocksize, state.quant_type)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # |values| beyond float16's range become ±inf, by rule
            out = out.astype(np.float16)
    elif dtype == "bfloat16":
        out = round_to_bfloat16(out)
    return out.reshape(state.shape)
