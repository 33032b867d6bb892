"""Python face of the native kernels: ``available()``, thin wrappers and ``register_fake``.

The ops themselves are ``torch.ops.q4lab.*``, defined in ``csrc/q4_cpu.cpp`` (TORCH_LIBRARY schemas,
CPU impl) and ``csrc/q4_cuda.cu`` (CUDA impl), built on first use by :mod:`q4lab._build`. The fake
(meta) implementations below give shapes and dtypes without data, so the ops work under
``torch.compile`` and ``torch.library.opcheck`` (pattern of pytorch/extension-cpp
``extension_cpp/ops.py``). Contract with ``q4lab/ops.py``: the five functions below.
"""
from __future__ import annotations

import torch

from . import _build
from .constants import NESTED_BLOCKSIZE

#: The quantization ops of ``csrc/q4_cpu.cpp``; each also has an ``<op>_out`` form writing into
#: given tensors (tests/test_kernels.py opchecks every one of them).
OPS = ("quantize_4bit", "quantize_absmax", "dequantize_absmax", "dequantize_4bit")
_status: dict = {}
_fakes_registered = False


def available(device_type: str) -> bool | str:
    """True if the ``device_type`` ("cpu" / "cuda") kernels are built and loaded, else why not.
    Builds on the first call; the answer is cached."""
    if device_type not in _status:
        _status[device_type] = _probe(device_type)
    return _status[device_type]


def _probe(device_type: str) -> bool | str:
    if device_type not in ("cpu", "cuda"):
        return f"no native kernel for device type {device_type!r}"
    if device_type == "cuda":
        if torch.version.cuda is None:
            return f"torch has no CUDA (this is torch {torch.__version__})"
        if not torch.cuda.is_available():
            return "torch has CUDA but no CUDA device is visible"
    result = _build.load()
    if result is not True and device_type == "cpu" and torch.cuda.is_available():
        result = _build.load(with_cuda=False)  # the CUDA build failed: the C++ kernels alone
    if result is True:
        _register_fakes()
    return result


def _require(t: torch.Tensor) -> None:
    status = available(t.device.type)
    if status is not True:
        raise RuntimeError(f"q4lab {t.device.type} kernels are not available: {status}")


def quantize_4bit(flat: torch.Tensor, blocksize: int, quant_type: str):
    """(packed uint8 [ceil(n/2)], absmax float32 [ceil(n/blocksize)]); NaN/Inf land in absmax."""
    _require(flat)
    packed, absmax = torch.ops.q4lab.quantize_4bit(flat, int(blocksize), quant_type)
    return packed, absmax


def quantize_absmax(absmax: torch.Tensor, offset: torch.Tensor | None = None):
    """(codes uint8 [nblocks], absmax2 float32 [ceil(nblocks / NESTED_BLOCKSIZE)], offset 0-d
    float32)."""
    _require(absmax)
    codes, absmax2, off = torch.ops.q4lab.quantize_absmax(absmax, offset)
    return codes, absmax2, off


def dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor,
                      offset: torch.Tensor) -> torch.Tensor:
    """float32 absmax [nblocks] = RN(RN(dyn[q] * absmax2) + offset)."""
    _require(codes)
    return torch.ops.q4lab.dequantize_absmax(codes, absmax2, offset)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    n: int, dtype: torch.dtype) -> torch.Tensor:
    """1-D tensor of ``n`` elements in ``dtype``: RN(table[code] * absmax), then RNE to dtype."""
    _require(packed)
    return torch.ops.q4lab.dequantize_4bit(packed, absmax, int(blocksize), quant_type, int(n),
                                           dtype)


def _cdiv(a, b):
    return (a + b - 1) // b


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    lib = "q4lab::"

    @torch.library.register_fake(lib + "quantize_4bit")
    def _(flat, blocksize, quant_type):
        n = flat.numel()
        return (flat.new_empty((_cdiv(n, 2),), dtype=torch.uint8),
                flat.new_empty((_cdiv(n, blocksize),), dtype=torch.float32))

    @torch.library.register_fake(lib + "quantize_absmax")
    def _(absmax, offset):
        n = absmax.numel()
        return (absmax.new_empty((n,), dtype=torch.uint8),
                absmax.new_empty((_cdiv(n, NESTED_BLOCKSIZE),), dtype=torch.float32),
                absmax.new_empty((), dtype=torch.float32))

    @torch.library.register_fake(lib + "dequantize_absmax")
    def _(codes, absmax2, offset):
        return codes.new_empty((codes.numel(),), dtype=torch.float32)

    @torch.library.register_fake(lib + "dequantize_4bit")
    def _(packed, absmax, blocksize, quant_type, n, dtype):
        return packed.new_empty((n,), dtype=dtype)

    for name in OPS:
        torch.library.register_fake(lib + name + "_out")(_fake_out)


def _fake_out(*args, **kwargs):
    return None
