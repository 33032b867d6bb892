"""``quantize_4bit`` / ``dequantize_4bit`` on NumPy arrays: the executable specification.

Mirrors bitsandbytes ``functional.py::quantize_4bit`` / ``dequantize_4bit`` (same outputs, same
QuantState fields), with q4lab's exact rounding rules (docs/format.md; see ``blockwise`` and
``double_quant`` for each step). Input checks live here too, so every backend rejects the same
inputs with the same messages. The other formats of ``q4lab.quant_types`` (MXFP4, NVFP4, GGUF's
Q4_0 / Q4_1, dequantize-only Q4_K / IQ4_NL) go to ``block_formats`` (docs/formats.md).
"""
from __future__ import annotations

import numpy as np

from .. import quant_types
from ..constants import BLOCKSIZES, DTYPES, QUANT_TYPES
from ..state import QuantState, nested_state
from . import block_formats
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
    """One of the absmax-codebook formats ``constants.QUANT_TYPES`` (what ``Linear4bit`` and
    the bitsandbytes layout hold); the other formats of ``q4lab.quant_types`` are named in the
    error, with where they are accepted."""
    if quant_type not in QUANT_TYPES:
        others = [q for q in quant_types.ALL_QUANT_TYPES if q not in QUANT_TYPES]
        hint = (f"; {quant_type!r} is accepted by q4lab.quantize_4bit / dequantize_4bit only"
                if quant_type in others else f" (q4lab.quantize_4bit also takes {others})")
        raise ValueError(f"quant_type={quant_type!r} is not supported here; use one of "
                         f"{QUANT_TYPES}{hint}")
    return quant_type


def check_format_args(quant_type, blocksize, double_quant):
    """The checked ``(quant_type, blocksize, double_quant)``: blocksize None is the format's
    own (64 for nf4 / fp4 / int4, 32 MXFP4, 16 NVFP4, 32 Q4_0 / Q4_1); double_quant None is True
    for nf4 / fp4 / int4 and False for the others, which refuse True."""
    qt = quant_types.get(quant_type)
    if qt.family == "bnb":
        blocksize = check_blocksize(qt.default_blocksize if blocksize is None else blocksize)
        return quant_type, blocksize, True if double_quant is None else bool(double_quant)
    blocksize = qt.check_blocksize(blocksize)
    if double_quant:
        raise ValueError(f"quant_type={quant_type!r} has no double quantization (its block "
                         f"scales are already 8 or 16 bits); pass double_quant=False or leave "
                         f"it unset")
    if not qt.can_quantize:
        raise ValueError(f"q4lab has no quantizer for {quant_type!r} (only dequantization of "
                         f"GGUF blocks); quantize to one of {quant_types.QUANTIZABLE}")
    return quant_type, blocksize, False


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
    if state.family != "bnb":  # "mx" / "gguf": the scales are codes that check themselves
        return
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


def quantize_4bit(x, blocksize: int | None = None, quant_type: str = "nf4",
                  double_quant: bool | None = None, offset=None, dtype: str | None = None,
                  tensor_scale="auto"):
    """Quantize an array to packed 4-bit codes. Returns ``(packed, state)``.

    packed: uint8 (ceil(n/2),), element 2j in the high nibble. state: :class:`QuantState` with
    float32 absmax per block, or (double_quant) uint8 absmax codes + offset + nested state.
    ``offset`` (double quant only) replaces the computed exact mean, e.g. to reproduce the nested
    codes of a bitsandbytes checkpoint from its ``nested_offset``. ``blocksize`` None: the
    format's own (64 for nf4 / fp4 / int4); ``double_quant`` None: True for those three.

    quant_type "mxfp4" / "nvfp4" / "q4_0" / "q4_1": blocks along each row, the format's own
    byte layout in ``packed`` and ``state.layout`` (``block_formats``); ``tensor_scale`` is
    NVFP4's float32 per-tensor scale ("auto": amax / 2688; None: one level; or a number).
    """
    quant_type, blocksize, double_quant = check_format_args(quant_type, blocksize,
                                                            double_quant)
    offset = check_offset(offset, double_quant)
    shape = tuple(np.shape(x))
    flat, dtype = as_float32(x, dtype)
    if flat.size == 0:
        raise ValueError(f"cannot quantize an empty array (shape {shape})")
    if quant_types.family(quant_type) != "bnb":
        block_formats.check_rows(shape, blocksize, quant_type)
        check_finite(flat, blocksize)
        return block_formats.quantize(flat, shape, dtype, quant_type, blocksize, tensor_scale)
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
    """The float32 absmax per block: stored as is, or decoded from the nested codes (other
    formats: the float32 scale that multiplies each block's code values)."""
    if state.family != "bnb":
        raise ValueError(f"{state.quant_type} stores no absmax; use "
                         f"q4lab.reference.block_formats.block_scales(packed, state)")
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
    dtype = _dtype_name(dtype or state.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"dtype={dtype!r} is not one of {DTYPES}")
    if state.family != "bnb":  # scales are codes inside the format's own bytes
        out = block_formats.dequantize(packed, state)
    else:
        check_statistics(state)
        codes = unpack_nibbles(packed, state.numel)
        out = decode(codes, state_absmax(state), state.blocksize, state.quant_type)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # |values| beyond float16's range become ±inf, by rule
            out = out.astype(np.float16)
    elif dtype == "bfloat16":
        out = round_to_bfloat16(out)
    return out.reshape(state.shape)
