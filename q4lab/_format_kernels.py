"""Python face of the native kernels of the registry's "mx" and "gguf" formats:
``torch.ops.q4lab.formats_quantize`` / ``formats_dequantize`` (``csrc/q4_formats_cpu.cpp``,
``csrc/q4_formats_cuda.cu``, arithmetic in ``csrc/q4_formats.h``), built with the other kernels by
:mod:`q4lab._build`. The bytes equal ``q4lab.reference.mx`` / ``gguf_quants``
(tests/test_formats_kernels.py). Contract with ``q4lab/ops.py``: the two functions below take
checked input (finite float32, whole blocks); the checks with messages are made in ``ops``.
"""
from __future__ import annotations

import torch

from ._kernels import _require

_BLOCK = {"mxfp4": (32, 0), "nvfp4": (16, 0), "q4_0": (32, 18), "q4_1": (32, 20),
          "q4_k": (256, 144), "iq4_nl": (32, 18)}
_fakes_registered = False


def register_fakes() -> None:
    """Fake (meta) implementations: shapes and dtypes without data, for torch.compile and
    ``torch.library.opcheck`` (pattern of pytorch/extension-cpp ``extension_cpp/ops.py``)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("q4lab::formats_quantize")
    def _(flat, quant_type, tensor_scale):
        block, block_bytes = _BLOCK[quant_type]
        n = flat.numel()
        mx = block_bytes == 0
        packed = flat.new_empty((n // 2 if mx else n // block * block_bytes,), dtype=torch.uint8)
        return packed, flat.new_empty((n // block if mx else 0,), dtype=torch.uint8)

    @torch.library.register_fake("q4lab::formats_dequantize")
    def _(packed, scales, quant_type, tensor_scale, n):
        return packed.new_empty((n,), dtype=torch.float32)


def formats_quantize(flat: torch.Tensor, quant_type: str, tensor_scale: torch.Tensor | None):
    """(packed uint8, scales uint8): mx codes low nibble first + one scale per block, or GGUF
    blocks (scales empty)."""
    _require(flat)
    register_fakes()
    return torch.ops.q4lab.formats_quantize(flat, quant_type, tensor_scale)


def formats_dequantize(packed: torch.Tensor, scales: torch.Tensor | None, quant_type: str,
                       tensor_scale: torch.Tensor | None, n: int) -> torch.Tensor:
    """float32 (n,) in the format's own decode."""
    _require(packed)
    register_fakes()
    if scales is None:
        scales = torch.empty(0, dtype=torch.uint8, device=packed.device)
    return torch.ops.q4lab.formats_dequantize(packed, scales, quant_type, tensor_scale, int(n))
