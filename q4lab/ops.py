"""Torch front end: ``q4lab.quantize_4bit`` / ``dequantize_4bit`` / ``backends()``.

Argument checks happen here once, for every backend; then the work goes to
- "reference": the NumPy specification (``q4lab.reference``), on the host;
- "cpu" / "cuda": the native kernels ``torch.ops.q4lab.*`` (``csrc/``, JIT-built by ``_build``,
  wrapped by ``_kernels``), which reproduce the reference bit for bit.
"auto" picks CUDA for CUDA tensors and the C++ kernel for CPU tensors, and falls back to the
reference with one warning if the kernels cannot be built. Storage is bitsandbytes' layout
(``functional.py::quantize_4bit``): packed uint8 (ceil(n/2),), high nibble first. The other
formats of ``q4lab.quant_types`` (MXFP4, NVFP4, Q4_0, Q4_1; dequantize-only Q4_K, IQ4_NL) keep
their own layouts (``q4lab.reference.block_formats``, docs/formats.md) and go to
``_block_format_kernels`` (the same backends).
"""
from __future__ import annotations

import warnings

import torch

from . import quant_types
from . import reference as ref
from .constants import DTYPES, NESTED_QUANT_TYPE
from .reference import block_formats, mx
from .reference.api import check_format_args, check_offset
from .state import QuantState, nested_state

#: torch dtype -> name and back, for the dtypes of ``constants.DTYPES`` (the one torch-side map).
TORCH_DTYPES = {getattr(torch, name): name for name in DTYPES}
DTYPE_OF_NAME = {name: dtype for dtype, name in TORCH_DTYPES.items()}
BACKENDS = ("auto", "reference", "cpu", "cuda")
_warned_fallback = False


def _kernels():
    from . import _kernels  # imported lazily: building the extension is deferred to first use

    return _kernels


def kernel_status(device_type: str):
    """True if the native kernels for ``device_type`` load here, else the reason as a string
    (a failing import of the wrapper module counts as a reason, never as a crash)."""
    try:
        return _kernels().available(device_type)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def backends() -> dict:
    """Which backends work here: {"reference": True, "cpu": True | "why not", "cuda": ...}."""
    return {"reference": True, **{d: kernel_status(d) for d in ("cpu", "cuda")}}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run for a tensor on ``device``."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if backend == "reference":
        return backend
    wanted = device.type if backend == "auto" else backend
    if wanted != device.type:
        raise ValueError(f"backend={backend!r} cannot run on a tensor on {device}")
    if wanted not in ("cpu", "cuda"):
        if backend == "auto":
            return "reference"
        raise ValueError(f"no native kernel for device type {device.type!r}")
    status = kernel_status(wanted)
    if status is True:
        return wanted
    if backend != "auto":
        raise RuntimeError(f"q4lab {wanted} kernels are not available: {status}")
    if not _warned_fallback:
        warnings.warn(f"q4lab native kernels unavailable ({status}); using the NumPy reference "
                      f"(same results, slower)", RuntimeWarning, stacklevel=3)
        _warned_fallback = True
    return "reference"


def _check_input(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}; for NumPy arrays use "
                        f"q4lab.reference.quantize_4bit")
    if w.dtype not in TORCH_DTYPES:
        raise TypeError(f"input dtype {w.dtype} is not supported; 4-bit quantization takes "
                        f"float32, float16 or bfloat16 (convert explicitly first)")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")


def _raise_non_finite(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> None:
    """Kernels propagate NaN/Inf into absmax; name the first bad block and element."""
    bad_blocks = (~torch.isfinite(absmax)).nonzero()
    if bad_blocks.numel() == 0:
        return
    b = int(bad_blocks[0])
    block = flat[b * blocksize:(b + 1) * blocksize].float()
    j = int((~torch.isfinite(block)).nonzero()[0])
    kind = "NaN" if torch.isnan(block[j]) else "Inf"
    raise ValueError(f"input contains {kind} at flat index {b * blocksize + j} (block {b}); "
                     f"4-bit quantization needs finite values")


_TABLES: dict = {}


def _table(name: str, device) -> torch.Tensor:
    """Shared codebook tensors, one per (name, device): states point at them, never copy them.
    ``name`` is a quant type or ``"dynamic"`` (the nested map)."""
    key = (name, str(device))
    if key not in _TABLES:
        if name == NESTED_QUANT_TYPE:
            values = ref.dynamic_map()
        elif quant_types.family(name) == "bnb":
            values = ref.codebook(name)
        else:
            values = block_formats.make_state((2 * 256,), "float32", name).code
        _TABLES[key] = torch.from_numpy(values).to(device)
    return _TABLES[key]


def quantize_4bit(w: torch.Tensor, blocksize: int | None = None, quant_type: str = "nf4",
                  double_quant: bool | None = None, backend: str = "auto", offset=None,
                  tensor_scale="auto"):
    """Quantize a tensor to 4 bits. Returns ``(packed, state)``: packed uint8 of length
    ceil(n/2) on ``w``'s device, and a :class:`QuantState` with torch tensors on that device.
    ``offset`` (double quant only) replaces the computed mean of the absmax values, e.g. a
    bitsandbytes checkpoint's ``nested_offset``.

    ``quant_type``: "nf4" (default), "fp4", "int4" (blocksize default 64, double_quant default
    True), or "mxfp4" (block 32), "nvfp4" (block 16; ``tensor_scale`` "auto" / None / a
    number), "q4_0", "q4_1" (block 32): blocks along each row, in the format's own layout
    (docs/formats.md); a blocksize other than the format's own is a ValueError."""
    _check_input(w)
    quant_type, blocksize, double_quant = check_format_args(quant_type, blocksize,
                                                            double_quant)
    offset = check_offset(offset, double_quant)
    which = resolve_backend(backend, w.device)
    dtype = TORCH_DTYPES[w.dtype]
    if quant_types.family(quant_type) != "bnb":
        return _block_format_quantize(w, quant_type, blocksize, tensor_scale, which, dtype)
    if which == "reference":
        flat = w.detach().reshape(-1).to("cpu", torch.float32).numpy()
        packed, state = ref.quantize_4bit(flat, blocksize, quant_type, double_quant,
                                          offset=offset,
                                          dtype=dtype)
        state.shape = tuple(w.shape)
        state = state.to(w.device)
        state.code = _table(quant_type, w.device)
        if state.nested:
            state.state2.code = _table(NESTED_QUANT_TYPE, w.device)
        return torch.from_numpy(packed).to(w.device), state
    k = _kernels()
    flat = w.detach().contiguous().reshape(-1)
    packed, absmax = k.quantize_4bit(flat, blocksize, quant_type)
    _raise_non_finite(flat, absmax, blocksize)
    state = QuantState(shape=tuple(w.shape), dtype=dtype, blocksize=blocksize,
                       quant_type=quant_type, code=_table(quant_type, w.device), absmax=absmax)
    if double_quant:
        given = None if offset is None else torch.tensor(offset, device=w.device)
        codes, absmax2, off = k.quantize_absmax(absmax, given)
        state.absmax, state.offset = codes, off
        state.state2 = nested_state(absmax.numel(), absmax2, _table(NESTED_QUANT_TYPE, w.device))
    return packed, state


def _block_format_quantize(w, quant_type, blocksize, tensor_scale, which, dtype):
    """quantize_4bit for the "mx" / "gguf" families: the NumPy reference on the host, or the
    C++ / CUDA kernels (``_format_kernels``: the same bytes, tests/test_formats_kernels.py).
    Every check with a message is the reference's, so both paths refuse alike."""
    if which == "reference":
        array = w.detach().to("cpu", torch.float32).numpy()
        packed, state = ref.quantize_4bit(array, blocksize, quant_type, False, dtype=dtype,
                                          tensor_scale=tensor_scale)
        state = state.to(w.device)
        state.code = _table(quant_type, w.device)
        return torch.from_numpy(packed).to(w.device), state
    from . import _format_kernels

    block_formats.check_rows(tuple(w.shape), blocksize, quant_type)
    flat = w.detach().contiguous().reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        ref.quantize_4bit(flat.cpu().numpy(), blocksize, quant_type, False)  # raises, names it
    qt = quant_types.get(quant_type)
    if qt.tensor_scale and isinstance(tensor_scale, str) and tensor_scale == "auto":
        # amax on the device, the division on the host: torch divides a CUDA tensor by a scalar
        # as a multiplication by its reciprocal (1 ulp off RN(amax / 2688) for some amax: seen
        # on an H200), and the spec is reference.mx.tensor_scale_of's one IEEE division.
        tensor_scale = float(mx.tensor_scale_of(flat.abs().max().cpu().numpy()))
    g = block_formats.check_tensor_scale(tensor_scale, None, qt)
    g_t = None if g is None else torch.tensor(g, dtype=torch.float32, device=w.device)
    packed, scales = _format_kernels.formats_quantize(flat, quant_type, g_t)
    if qt.family == "gguf":
        _check_gguf_scales(packed, qt, flat)
    state = block_formats.make_state(tuple(w.shape), dtype, quant_type).to(w.device)
    state.absmax = scales if qt.family == "mx" else None
    state.tensor_scale = g_t
    state.code = _table(quant_type, w.device)
    return packed, state


def _check_gguf_scales(packed, qt, flat) -> None:
    """fp16 scales that overflowed to inf: refuse with the reference's message."""
    halves = packed.reshape(-1, qt.block_bytes)[:, :4 if qt.name == "q4_1" else 2]
    as_f16 = halves.contiguous().view(torch.float16)
    if bool(torch.isinf(as_f16).any()):
        ref.quantize_4bit(flat.cpu().numpy(), qt.default_blocksize, qt.name, False)
        raise AssertionError("kernel and reference disagree on an fp16 overflow")


def absmax_of(state: QuantState, backend: str = "auto") -> torch.Tensor:
    """The float32 absmax per block of a torch state (decoded from nested codes if needed)."""
    if not state.nested:
        return state.absmax.float()
    which = resolve_backend(backend, state.absmax.device)
    if which == "reference":
        values = ref.state_absmax(state.numpy())
        return torch.from_numpy(values).to(state.absmax.device)
    return _kernels().dequantize_absmax(state.absmax, state.state2.absmax,
                                        state.offset.reshape(()).float())


def check_state(packed: torch.Tensor, state: QuantState) -> None:
    """Raise a clear error when ``packed`` and ``state`` do not belong together."""
    if not isinstance(state, QuantState):
        raise TypeError(f"expected a q4lab QuantState, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed data must be a uint8 tensor, got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)}")
    state.validate(packed)
    tensors = [state.absmax, state.tensor_scale]
    tensors += [state.state2.absmax, state.offset] if state.nested else []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device != packed.device:
            raise ValueError(f"state tensors are on {t.device} but packed data is on "
                             f"{packed.device}; move both with state.to(device)")


def _output_dtype(dtype) -> torch.dtype:
    """torch.float32/float16/bfloat16 or their names; anything else is a TypeError naming them."""
    if isinstance(dtype, str):
        dtype = DTYPE_OF_NAME.get(dtype.replace("torch.", ""), dtype)
    if dtype not in TORCH_DTYPES:
        raise TypeError(f"dtype {dtype!r} is not supported for dequantized output; use one of "
                        f"{[str(d) for d in TORCH_DTYPES]}")
    return dtype


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype=None,
                    backend: str = "auto") -> torch.Tensor:
    """Dequantize to a tensor of ``state.shape`` in ``dtype`` (default: the original dtype)."""
    if not state.is_torch:
        state = state.to(packed.device)
    check_state(packed, state)
    dtype = _output_dtype(dtype or str(state.dtype))
    which = resolve_backend(backend, packed.device)
    if state.family != "bnb" and which != "reference":
        from . import _format_kernels

        out = _format_kernels.formats_dequantize(packed.reshape(-1), state.absmax,
                                                 state.quant_type, state.tensor_scale,
                                                 state.numel)
        return out.reshape(state.shape).to(dtype)
    if which == "reference":
        out = ref.dequantize_4bit(packed.cpu().numpy(), state.numpy(), "float32")
        return torch.from_numpy(out).to(packed.device).to(dtype)  # float32 -> RNE fp16/bf16
    absmax = absmax_of(state, which)
    out = _kernels().dequantize_4bit(packed.reshape(-1), absmax, state.blocksize,
                                     state.quant_type, state.numel, dtype)
    return out.reshape(state.shape)
