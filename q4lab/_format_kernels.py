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


def formats_quantize(flat: torch.Tensor, quant_type: str, tensor_scale: torch.Tensor | None):
    """(packed uint8, scales uint8): mx codes low nibble first + one scale per block, or GGUF
    blocks (scales empty)."""
    _require(flat)
    return torch.ops.q4lab.formats_quantize(flat, quant_type, tensor_scale)


def formats_dequantize(packed: torch.Tensor, scales: torch.Tensor | None, quant_type: str,
                       tensor_scale: torch.Tensor | None, n: int) -> torch.Tensor:
    """float32 (n,) in the format's own decode."""
    _require(packed)
    if scales is None:
        scales = torch.empty(0, dtype=torch.uint8, device=packed.device)
    return torch.ops.q4lab.formats_dequantize(packed, scales, quant_type, tensor_scale, int(n))
