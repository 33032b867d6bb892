"""QuantState: everything needed to dequantize a packed 4-bit tensor, with bitsandbytes' field
names.

Source: bitsandbytes ``functional.py::QuantState`` (fields ``absmax, shape, code, blocksize,
quant_type, dtype, offset, state2``) and its ``as_dict(packed=True)`` state-dict layout
(``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``). One class serves both payloads: NumPy arrays (the
reference) and torch tensors (the front end); this module imports torch only inside the methods
that convert to or from it, so ``q4lab.reference`` stays importable without torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import quant_types
from .constants import (BLOCKSIZES, DTYPE_BYTES, DTYPES, NESTED_BLOCKSIZE, NESTED_DTYPE,
                        NESTED_QUANT_TYPE, OFFSET_BYTES)


class DtypeName(str):
    """A dtype name ('float32', 'float16', 'bfloat16') that also equals the torch dtype of that
    name, so ``state.dtype == torch.bfloat16`` and ``state.dtype == "bfloat16"`` both hold."""

    def __eq__(self, other):
        if type(other).__name__ == "dtype" and str(other).startswith("torch."):
            other = str(other)[len("torch."):]
        return str.__eq__(self, other)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__

    @property
    def torch(self):
        import torch

        return getattr(torch, str(self))


def _nbytes(a) -> int:
    if a is None:
        return 0
    if hasattr(a, "nbytes"):
        return int(a.nbytes)
    return int(a.numel() * a.element_size())


def _numel(a) -> int:
    return int(a.size if isinstance(a, np.ndarray) else a.numel())


def _payload(a, scalar: bool = False):
    """(dtype name, shape, bytes) of a NumPy array or torch tensor, on the host, C order: what
    :meth:`QuantState.__eq__` compares. ``scalar``: the offset, a float32 scalar stored as a float,
    a 0-d or a one-element array (its shape is not part of its value)."""
    if a is None:
        return None
    if isinstance(a, (float, np.floating)):
        a = np.asarray(a, dtype=np.float32)  # as QuantState.to() / numpy() store it
    if isinstance(a, np.ndarray):
        kind, shape = a.dtype.name, a.shape
        data = np.ascontiguousarray(a).tobytes()
    else:  # a torch tensor (any device; torch is already imported if one exists)
        import torch

        kind, shape = str(a.dtype).replace("torch.", ""), tuple(a.shape)
        flat = a.detach().reshape(-1).cpu().contiguous()
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return (kind, () if scalar and math.prod(shape) == 1 else tuple(shape), data)


def _describe(a) -> str:
    """``float32[108]`` for an array, ``None`` for none: the repr's summary of one payload."""
    if a is None:
        return "None"
    if isinstance(a, (float, np.floating)):
        return f"float {float(a):.7g}"
    kind = str(a.dtype).replace("torch.", "")
    return f"{kind}[{', '.join(str(int(d)) for d in a.shape)}]"


@dataclass(eq=False)
class QuantState:
    """How to turn packed nibbles back into a tensor.

    shape, dtype      original shape and dtype name ('float32' | 'float16' | 'bfloat16')
    blocksize         elements per absmax block (32 ... 4096)
    quant_type        'nf4' | 'fp4' | 'int4' (int4 is q4lab-only, for comparison), or another
                      format of ``q4lab.quant_types.REGISTRY`` ('mxfp4', 'nvfp4', 'q4_0', ...)
    code              the 16-entry float32 codebook (shared constant; not counted in nbytes)
    absmax            float32 per block, or uint8 dynamic-map codes when double-quantized;
                      "mx" family: the uint8 block scale (E8M0 / E4M3 bits); "gguf": None (the
                      scales live inside the packed GGUF blocks)
    offset            float32 scalar subtracted before double quantization (None if not nested)
    state2            nested state: absmax = float32 per 256 blocks, code = dynamic map,
                      blocksize = 256, quant_type = 'dynamic'
    layout            byte order of packed: 'bnb' (high nibble first), 'torchao' (low nibble
                      first), 'gguf' (GGUF blocks: scales interleaved, nibbles j and j + 16)
    tensor_scale      NVFP4's float32 per-tensor scale (0-d array or tensor), else None

    Equality (``==``, as bitsandbytes' ``QuantState.__eq__``): shape, dtype, blocksize, quant_type,
    code, absmax, offset and the nested state all equal (and, beyond bitsandbytes' formats, the
    layout and NVFP4's tensor_scale), the arrays compared exactly: same dtype,
    same shape, same bytes. Bytes, not values, because bytes are what a state decodes to: an absmax
    of -0.0 and one of +0.0 give zeros of different sign, so they differ; a NaN equals the same NaN
    bit pattern, so every state equals itself and its copies. Where the arrays live is not part of
    the state: a NumPy-payload state equals its torch copy (``state.to()``, ``state.numpy()``) on
    any device, and ``is_torch`` tells them apart. The offset is compared as the float32 scalar it
    is (a float, 0-d or one-element array). States are mutable and hold arrays, so they are
    unhashable (``__hash__ = None``). ``pickle`` and ``copy.deepcopy`` give an equal state.
    """

    shape: tuple
    dtype: str
    blocksize: int
    quant_type: str
    code: Any
    absmax: Any
    offset: Any = None
    state2: QuantState | None = None
    layout: str = "bnb"
    tensor_scale: Any = None

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        self.blocksize = int(self.blocksize)
        if self.dtype is not None:
            name = str(self.dtype).replace("torch.", "")
            self.dtype = DtypeName(name)

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        if self is other:
            return True
        return (self.shape == other.shape and str(self.dtype) == str(other.dtype)
                and self.blocksize == other.blocksize and self.quant_type == other.quant_type
                and _payload(self.code) == _payload(other.code)
                and _payload(self.absmax) == _payload(other.absmax)
                and _payload(self.offset, scalar=True) == _payload(other.offset, scalar=True)
                and self.layout == other.layout
                and _payload(self.tensor_scale, scalar=True)
                == _payload(other.tensor_scale, scalar=True)
                and self.state2 == other.state2)  # None == None, or a QuantState's own __eq__

    __hash__ = None  # mutable and equal by content: not usable as a dict key or in a set

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def is_torch(self) -> bool:
        held = self.absmax if self.absmax is not None else self.code
        return not isinstance(held, np.ndarray)

    @property
    def family(self) -> str:
        """'bnb', 'mx' or 'gguf' (``q4lab.quant_types``)."""
        return quant_types.get(self.quant_type).family

    # ---- memory accounting -------------------------------------------------------------
    def nbytes(self, include_codebooks: bool = False) -> dict:
        """Bytes actually stored for this state, by part (packed data is not part of the state:
        see :func:`storage_bytes`). Codebooks are shared constants and counted only on request."""
        parts = {} if self.absmax is None else {"absmax": _nbytes(self.absmax)}
        if self.tensor_scale is not None:
            parts["tensor_scale"] = DTYPE_BYTES["float32"]
        if self.nested:
            parts["nested_absmax"] = _nbytes(self.state2.absmax)
            parts["offset"] = OFFSET_BYTES
        if include_codebooks:
            parts["quant_map"] = _nbytes(self.code)
            if self.nested:
                parts["nested_quant_map"] = _nbytes(self.state2.code)
        return parts

    def validate(self, packed=None) -> None:
        """Raise ValueError naming the first inconsistency between this state and ``packed``."""
        if self.quant_type not in quant_types.REGISTRY:
            raise ValueError(f"state.quant_type={self.quant_type!r} is not one of "
                             f"{quant_types.ALL_QUANT_TYPES}")
        qt = quant_types.get(self.quant_type)
        if self.blocksize not in qt.blocksizes:
            raise ValueError(f"state.blocksize={self.blocksize} is not one of {qt.blocksizes} "
                             f"({self.quant_type})")
        if self.dtype not in DTYPES:
            raise ValueError(f"state.dtype={self.dtype!r} is not one of {DTYPES}")
        if self.layout != qt.layout:
            raise ValueError(f"state.layout={self.layout!r} but {self.quant_type} is stored in "
                             f"the {qt.layout!r} layout")
        if qt.family != "bnb":
            return self._validate_block_format(qt, packed)
        absmax_kind = str(self.absmax.dtype).replace("torch.", "")
        wanted = "uint8" if self.nested else "float32"
        if absmax_kind != wanted:
            raise ValueError(
                f"state.absmax is {absmax_kind} but a {'nested' if self.nested else 'plain'} state "
                f"stores {wanted} absmax ({'8-bit codes' if self.nested else 'one per block'})"
            )
        if self.nested and str(self.state2.absmax.dtype).replace("torch.", "") != NESTED_DTYPE:
            raise ValueError(f"state.state2.absmax must be {NESTED_DTYPE}, got "
                             f"{self.state2.absmax.dtype}")
        if _numel(self.absmax) != self.nblocks:
            raise ValueError(
                f"state has {_numel(self.absmax)} absmax values but shape {tuple(self.shape)} at "
                f"blocksize {self.blocksize} needs {self.nblocks}"
            )
        if self.nested:
            groups = -(-self.nblocks // NESTED_BLOCKSIZE)
            if _numel(self.state2.absmax) != groups or self.offset is None:
                raise ValueError(
                    f"nested state needs {groups} nested absmax values and an offset, got "
                    f"{_numel(self.state2.absmax)} and offset={self.offset!r}"
                )
        if packed is not None:
            need = -(-self.numel // 2)
            have = _numel(packed)
            if have != need:
                raise ValueError(
                    f"packed data has {have} bytes but state shape {tuple(self.shape)} needs {need}"
                )

    def _validate_block_format(self, qt, packed) -> None:
        """validate() for the "mx" and "gguf" families (q4lab.reference.block_formats)."""
        if self.nested:
            raise ValueError(f"{self.quant_type} has no double quantization (state2 is set)")
        if len(self.shape) == 0 or self.shape[-1] % self.blocksize:
            raise ValueError(f"{self.quant_type} state shape {tuple(self.shape)}: the last "
                             f"dimension must be a multiple of {self.blocksize}")
        if qt.family == "mx":
            kind = str(self.absmax.dtype).replace("torch.", "") if self.absmax is not None \
                else None
            if kind != "uint8" or _numel(self.absmax) != self.nblocks:
                raise ValueError(f"{self.quant_type} state needs {self.nblocks} uint8 block "
                                 f"scales, got {kind} x "
                                 f"{0 if self.absmax is None else _numel(self.absmax)}")
            if self.tensor_scale is not None and (not qt.tensor_scale
                                                  or _numel(self.tensor_scale) != 1):
                raise ValueError(f"{self.quant_type} state: tensor_scale must be one float32 "
                                 f"(NVFP4 only), got {self.tensor_scale!r}")
            need = self.numel // 2
        else:
            if self.absmax is not None or self.tensor_scale is not None:
                raise ValueError(f"{self.quant_type} keeps its scales inside the GGUF blocks; "
                                 f"state.absmax and state.tensor_scale must be None")
            need = self.nblocks * qt.block_bytes
        if packed is not None and _numel(packed) != need:
            raise ValueError(f"packed data has {_numel(packed)} bytes but a {self.quant_type} "
                             f"tensor of shape {tuple(self.shape)} needs {need}")

    # ---- conversions -------------------------------------------------------------------
    def to(self, device=None) -> QuantState:
        """A copy whose arrays are torch tensors on ``device`` (from NumPy or another device)."""
        import torch

        def conv(a):
            if a is None:
                return None
            t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
            return t.to(device) if device is not None else t

        nested = self.state2.to(device) if self.state2 is not None else None
        return replace(self, code=conv(self.code), absmax=conv(self.absmax),
                       offset=conv(self._offset_array()), state2=nested,
                       tensor_scale=conv(self.tensor_scale))

    def numpy(self) -> QuantState:
        """A copy whose arrays are NumPy arrays on the host."""

        def conv(a):
            if a is None or isinstance(a, np.ndarray):
                return a
            return a.detach().cpu().numpy()

        nested = self.state2.numpy() if self.state2 is not None else None
        return replace(self, code=conv(self.code), absmax=conv(self.absmax),
                       offset=conv(self._offset_array()), state2=nested,
                       tensor_scale=conv(self.tensor_scale))

    def _offset_array(self):
        if self.offset is None or not isinstance(self.offset, (float, np.floating)):
            return self.offset
        return np.asarray(self.offset, dtype=np.float32)

    @property
    def offset_value(self) -> float:
        """The offset as a Python float (exact: float32 -> float64)."""
        o = self.offset
        return float(o.item() if hasattr(o, "item") else o)

    def bnb_json(self) -> dict:
        """The non-tensor items as bitsandbytes serializes them (``quant_state.bitsandbytes__*``).
        """
        d = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": self.dtype,
             "shape": list(self.shape)}
        if self.nested:
            d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype=NESTED_DTYPE,
                     nested_offset=self.offset_value)
        return d

    # ---- display -----------------------------------------------------------------------
    def __repr__(self) -> str:
        """One line, never raising (also for a state that ``validate`` would refuse), e.g.
        ``QuantState(nf4, shape=(72, 96), dtype=bfloat16, blocksize=64, 108 blocks,
        absmax=uint8[108], nested, offset=0.0123, state2=QuantState(dynamic, ...), torch cpu)``."""
        if self.absmax is None or isinstance(self.absmax, np.ndarray):
            where = "numpy"
        else:
            where = f"torch {getattr(self.absmax, 'device', '')}".rstrip()
        count = self.nblocks if self.blocksize > 0 else 0
        blocks = f"{count} block{'' if count == 1 else 's'}"
        parts = [str(self.quant_type), f"shape={tuple(self.shape)}", f"dtype={self.dtype}",
                 f"blocksize={self.blocksize}", blocks, f"absmax={_describe(self.absmax)}"]
        if self.state2 is not None:
            parts.append("nested")
        if self.offset is not None:
            try:
                parts.append(f"offset={self.offset_value:.7g}")
            except (TypeError, ValueError, RuntimeError):  # not a scalar: show what it is
                parts.append(f"offset={_describe(self.offset)}")
        if self.state2 is not None:
            parts.append(f"state2={self.state2!r}")
        return f"QuantState({', '.join(parts)}, {where})"

    def _repr_html_(self) -> str:
        total = storage_bytes(self)
        rows = [("quant type", self.quant_type), ("shape", tuple(self.shape)),
                ("original dtype", self.dtype), ("blocksize", self.blocksize),
                ("blocks", f"{self.nblocks:,}"),
                ("double quant", f"yes, offset {self.offset_value:.7g}" if self.nested else "no")]
        rows += [(f"bytes: {k}", f"{v:,}") for k, v in total.items()]
        rows.append(("bits / param", f"{bits_per_param(self):.4f}"))
        body = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>"
                       for k, v in rows)
        return f"<table><caption>q4lab QuantState</caption>{body}</table>"


def nested_state(nblocks: int, absmax2, code) -> QuantState:
    """The nested state of a double-quantized tensor with ``nblocks`` blocks: ``absmax2`` (float32,
    one per group of ``NESTED_BLOCKSIZE`` blocks) and ``code`` (the dynamic map), NumPy or torch
    (docs/format.md §7). The one place a nested state is built."""
    return QuantState(shape=(nblocks,), dtype=NESTED_DTYPE, blocksize=NESTED_BLOCKSIZE,
                      quant_type=NESTED_QUANT_TYPE, code=code, absmax=absmax2)


def storage_bytes_for(numel: int, blocksize: int | None = 64, double_quant: bool = True,
                      quant_type: str = "nf4", tensor_scale: bool = False) -> dict:
    """Bytes stored for one quantized tensor of ``numel`` values, by part, without any tensor
    (docs/format.md §11): packed codes ceil(n/2); absmax 4 bytes per block (float32), or 1 byte
    per block (uint8 code) when double-quantized; then nested absmax 4 bytes per group of 256
    blocks and the 4-byte offset. Works for any size (a 70B-parameter count included). The
    codebooks are shared constants and are not counted (bitsandbytes also writes a 64-byte
    quant_map and a 1 KiB nested_quant_map per layer into its state dict).

    Other formats (``quant_type``, docs/formats.md; ``blocksize`` None means the format's own):
    "mx" packed n/2 + one uint8 scale per block (+ 4 bytes for NVFP4's ``tensor_scale``);
    "gguf" ``block_bytes`` per block, scales included."""
    if isinstance(numel, bool) or int(numel) != numel or numel <= 0:
        raise ValueError(f"numel={numel!r}: a quantized tensor holds a positive whole number of "
                         f"values")
    qt = quant_types.get(quant_type)
    if qt.family != "bnb":
        return _block_format_bytes(int(numel), qt, qt.check_blocksize(blocksize),
                                   double_quant, tensor_scale)
    blocksize = qt.default_blocksize if blocksize is None else blocksize
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not one of {BLOCKSIZES}")
    numel = int(numel)
    nblocks = -(-numel // blocksize)
    if not double_quant:
        return {"packed": -(-numel // 2), "absmax": DTYPE_BYTES["float32"] * nblocks}
    return {"packed": -(-numel // 2), "absmax": nblocks,  # one uint8 code per block
            "nested_absmax": DTYPE_BYTES[NESTED_DTYPE] * -(-nblocks // NESTED_BLOCKSIZE),
            "offset": OFFSET_BYTES}


def _block_format_bytes(numel: int, qt, blocksize: int, double_quant: bool,
                        tensor_scale: bool) -> dict:
    if double_quant:
        raise ValueError(f"{qt.name} has no double quantization; pass double_quant=False")
    if tensor_scale and not qt.tensor_scale:
        raise ValueError(f"{qt.name} has no per-tensor scale")
    nblocks = -(-numel // blocksize)
    if qt.family == "gguf":
        return {"packed": nblocks * qt.block_bytes}
    parts = {"packed": -(-numel // 2), "absmax": nblocks * qt.scale_bytes}
    if tensor_scale:
        parts["tensor_scale"] = DTYPE_BYTES["float32"]
    return parts


def storage_bytes(state: QuantState) -> dict:
    """Bytes stored for one quantized tensor, by part (:func:`storage_bytes_for` of its size,
    blocksize and nesting), checked against the bytes its arrays really hold: a state whose arrays
    do not have the format's sizes is a ValueError, never a wrong count."""
    parts = storage_bytes_for(state.numel, state.blocksize, state.nested, state.quant_type,
                              state.tensor_scale is not None)
    held = state.nbytes()
    wrong = {k: (v, parts.get(k)) for k, v in held.items() if parts.get(k) != v}
    if wrong:
        raise ValueError(f"state arrays hold {wrong} bytes (held, format) for shape "
                         f"{tuple(state.shape)} at blocksize {state.blocksize}")
    return parts


def bits_per_param(state, numel: int | None = None, blocksize: int | None = None,
                   double_quant: bool | None = None, tensor_scale: bool | None = None) -> float:
    """Storage bits per parameter from the actual bytes: 8 * sum(storage_bytes) / numel.
    4096x4096 NF4 at blocksize 64: 4.5 without double quant, 4.127 with it (QLoRA §3).

    ``state`` may also be a format name ("nf4", "mxfp4", "nvfp4", "q4_0", ...): then the bits of
    a tensor of ``numel`` values (default 4096 * 4096) at ``blocksize`` (default: the format's
    own), with ``double_quant`` (default: True for nf4 / fp4 / int4, else False) and
    ``tensor_scale`` (default: NVFP4's float32 per tensor)."""
    if isinstance(state, QuantState):
        return 8.0 * sum(storage_bytes(state).values()) / state.numel
    qt = quant_types.get(state)
    numel = 4096 * 4096 if numel is None else numel
    double_quant = (qt.family == "bnb") if double_quant is None else double_quant
    tensor_scale = qt.tensor_scale if tensor_scale is None else tensor_scale
    parts = storage_bytes_for(numel, blocksize, double_quant, qt.name, tensor_scale)
    return 8.0 * sum(parts.values()) / numel
