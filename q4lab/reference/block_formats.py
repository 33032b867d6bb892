"""quantize / dequantize for the registry's "mx" and "gguf" families (``q4lab.quant_types``):
MXFP4, NVFP4, Q4_0, Q4_1 and (dequantize only) Q4_K, IQ4_NL, on NumPy arrays.

The rounding rules are in ``mx`` (OCP MX v1.0, NVIDIA NVFP4, as torchao) and ``gguf_quants``
(as the gguf package and ggml). This module adds what every format shares: input checks (blocks
run along each row, so the last dimension must be a multiple of the block, as torchao's ``to_mx``
and ``gguf.quants.quantize`` require; NaN/Inf are refused), the QuantState each format records
(its byte layout and, for NVFP4, the float32 tensor scale), and output dtypes.

State per family (docs/formats.md):
- "mx": packed = the codes, row-major, first element in the LOW nibble (numel / 2 bytes);
  absmax = one uint8 per block: the E8M0 exponent (MXFP4) or the E4M3 bit pattern (NVFP4);
  tensor_scale = NVFP4's float32 g, or None; code = the 16 E2M1 values.
- "gguf": packed = the GGUF blocks exactly as a GGUF file stores them (scales interleaved with
  codes, block_bytes per block, row-major); absmax = None; code = the values before scaling.
"""
from __future__ import annotations

import math

import numpy as np

from .. import quant_types
from ..state import QuantState
from . import gguf_quants, mx

F32 = np.float32


def check_rows(shape: tuple, blocksize: int, quant_type: str) -> int:
    """Blocks run along each row: the last dimension must be a multiple of the block."""
    if len(shape) == 0:
        raise ValueError(f"quant_type={quant_type!r} quantizes rows; got a 0-d array")
    if shape[-1] % blocksize:
        raise ValueError(
            f"quant_type={quant_type!r} quantizes blocks of {blocksize} along each row, but the "
            f"last dimension of shape {tuple(shape)} is not a multiple of {blocksize} (torchao "
            f"and GGUF refuse it too); pad the rows, or use nf4 / fp4, whose blocks run over the "
            f"flattened tensor")
    return shape[-1]


def check_tensor_scale(tensor_scale, flat: np.ndarray, qt) -> np.float32 | None:
    """NVFP4's g: "auto" -> ``mx.tensor_scale_of``; None -> single-level; else a positive
    finite float32 whose reciprocal is finite. Other formats take "auto" (meaning none)."""
    if not qt.tensor_scale:
        if isinstance(tensor_scale, str) and tensor_scale == "auto" or tensor_scale is None:
            return None
        raise ValueError(f"quant_type={qt.name!r} has no per-tensor scale; drop "
                         f"tensor_scale={tensor_scale!r}")
    if tensor_scale is None:
        return None
    if isinstance(tensor_scale, str):
        if tensor_scale != "auto":
            raise ValueError(f"tensor_scale={tensor_scale!r}: use 'auto', None or a number")
        g = mx.tensor_scale_of(flat)
    else:
        value = tensor_scale.item() if hasattr(tensor_scale, "item") else tensor_scale
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise TypeError(f"tensor_scale must be a number, 'auto' or None, got "
                            f"{type(tensor_scale).__name__}")
        g = F32(value)
    with np.errstate(divide="ignore", over="ignore"):
        ok = np.isfinite(g) and g > 0 and np.isfinite(F32(1.0) / g)
    if not ok:
        raise ValueError(f"NVFP4 tensor_scale g = {float(g)!r} must be a positive float32 whose "
                         f"reciprocal is finite (g >= 2^-127); with tensor_scale='auto' the "
                         f"tensor's amax is too small: pass tensor_scale=None (one level)")
    return F32(g)


def quantize(flat: np.ndarray, shape: tuple, dtype: str, quant_type: str, blocksize: int,
             tensor_scale="auto") -> tuple[np.ndarray, QuantState]:
    """Quantize checked finite float32 ``flat`` of ``shape``: ``(packed, state)``."""
    qt = quant_types.get(quant_type)
    if not qt.can_quantize:
        raise ValueError(f"q4lab has no quantizer for {quant_type!r} (only dequantization of "
                         f"GGUF blocks); quantize to one of {quant_types.QUANTIZABLE}")
    check_rows(shape, blocksize, quant_type)
    g = check_tensor_scale(tensor_scale, flat, qt)
    blocks = flat.reshape(-1, blocksize)
    absmax = None
    if quant_type == "mxfp4":
        packed, absmax = mx.mxfp4_quantize(blocks)
    elif quant_type == "nvfp4":
        packed, absmax = mx.nvfp4_quantize(blocks, g)
    else:
        packed = gguf_quants.QUANTIZE[quant_type](blocks).reshape(-1)
    return packed, make_state(shape, dtype, quant_type, absmax, g)


def make_state(shape, dtype, quant_type, absmax=None, tensor_scale=None) -> QuantState:
    """The state of a tensor in one of the "mx" / "gguf" formats (see the module docstring)."""
    qt = quant_types.get(quant_type)
    code = mx.e2m1_codebook() if qt.family == "mx" else gguf_quants.codebook(quant_type)
    g = None if tensor_scale is None else np.asarray(tensor_scale, dtype=F32)
    return QuantState(shape=tuple(shape), dtype=dtype, blocksize=qt.default_blocksize,
                      quant_type=quant_type, code=code, absmax=absmax, layout=qt.layout,
                      tensor_scale=g)


def state_from_gguf(blocks, shape, quant_type: str, dtype: str = "float32"):
    """``(packed, state)`` for raw GGUF block bytes of a tensor of ``shape`` (row-major, last
    dimension a multiple of the block), e.g. as ``q4lab.formats.gguf`` reads them."""
    qt = quant_types.get(quant_type)
    if qt.family != "gguf":
        raise ValueError(f"quant_type={quant_type!r} is not a GGUF block type")
    shape = tuple(int(d) for d in shape)
    check_rows(shape, qt.default_blocksize, quant_type)
    packed = np.ascontiguousarray(np.asarray(blocks, dtype=np.uint8).reshape(-1))
    state = make_state(shape, dtype, quant_type)
    state.validate(packed)
    return packed, state


def dequantize(packed: np.ndarray, state: QuantState) -> np.ndarray:
    """float32, flat: the format's own decode (``mx`` / ``gguf_quants``)."""
    qt = quant_types.get(state.quant_type)
    g = None if state.tensor_scale is None else F32(np.asarray(state.tensor_scale).item())
    if state.quant_type == "mxfp4":
        return mx.mxfp4_dequantize(packed, state.absmax, qt.default_blocksize)
    if state.quant_type == "nvfp4":
        return mx.nvfp4_dequantize(packed, state.absmax, g, qt.default_blocksize)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf fp16 scales decode as such
        return gguf_quants.DEQUANTIZE[state.quant_type](packed).reshape(-1)


def block_scales(packed: np.ndarray, state: QuantState) -> np.ndarray:
    """The float32 scale of every block (what multiplies the code values), for display."""
    g = None if state.tensor_scale is None else F32(np.asarray(state.tensor_scale).item())
    if state.quant_type == "mxfp4":
        return mx.e8m0_decode(state.absmax)
    if state.quant_type == "nvfp4":
        return mx.nvfp4_block_scales(state.absmax, g)
    return gguf_quants.block_scales(packed, state.quant_type)


def packed_nbytes(shape, quant_type: str) -> int:
    """Bytes of ``packed`` for a tensor of ``shape``."""
    qt = quant_types.get(quant_type)
    numel = math.prod(shape)
    if qt.family == "gguf":
        return numel // qt.default_blocksize * qt.block_bytes
    return numel // 2
