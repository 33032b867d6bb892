"""A model's linear weights replaced by their 4-bit round trip, in any registry format, and the
format spec that names one (``FormatSpec``): what the quality lab (``q4lab.quality``) and the
landscape (``q4lab.landscape``) run for the formats ``Linear4bit`` does not compute in (MXFP4,
NVFP4, Q4_0, Q4_1; ``q4lab/quant_types.py``). Quantize and dequantize are ``q4lab.quantize_4bit``
/ ``dequantize_4bit`` (the references in ``q4lab/reference/``, the kernels in ``csrc/``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import quant_types
from .state import storage_bytes


@dataclass(frozen=True)
class FormatSpec:
    """One row of the landscape: a registry format with its blocksize and double quant."""

    quant_type: str
    blocksize: int | None = None
    double_quant: bool | None = None

    def __post_init__(self):
        qt = quant_types.get(self.quant_type)
        if not qt.can_quantize:
            raise ValueError(f"{self.quant_type} has no quantizer in q4lab (dequantize only)")
        object.__setattr__(self, "blocksize", qt.check_blocksize(self.blocksize))
        if self.double_quant is None:
            object.__setattr__(self, "double_quant", qt.family == "bnb")

    @property
    def label(self) -> str:
        dq = "+DQ" if self.double_quant else ""
        return f"{self.quant_type.upper()}{dq}/{self.blocksize}"


@contextmanager
def round_tripped(model: nn.Module, spec: FormatSpec, names: list[str],
                  cache: dict | None = None):
    """``with round_tripped(model, spec) as info:`` -- the named linear weights replaced by their
    4-bit round trip; ``info`` = {"params", "bytes", "bits_per_param", "layers", "float_bytes"}
    of those layers ("float_bytes": what the stand-in float32 weights occupy). Each layer gets a
    new, frozen ``nn.Parameter``, so a weight tied to another module (SmolLM2's lm_head and
    embedding) changes in that layer only. On exit (even after an error) every original
    parameter object is put back. ``cache`` (a dict the caller keeps, for ONE model): round
    trips by (spec, layer name), so a layer is quantized once however often it is used (the
    comparison, then the sensitivity per layer kind)."""
    from . import dequantize_4bit, quantize_4bit

    names = list(names)
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"no nn.Linear called {missing[0]!r} in the model")
    originals, params, nbytes, float_bytes = {}, 0, 0, 0
    try:
        for name in names:
            layer = modules[name]
            w = layer.weight
            hit = None if cache is None else cache.get((spec, name))
            if hit is None:
                packed, state = quantize_4bit(w.detach().float(), spec.blocksize,
                                              spec.quant_type, double_quant=spec.double_quant)
                out = dequantize_4bit(packed, state, torch.float32).to(w.dtype)
                hit = (out, sum(storage_bytes(state).values()))
                if cache is not None:
                    cache[(spec, name)] = hit
            originals[name] = w
            layer.weight = nn.Parameter(hit[0], requires_grad=False)
            params += w.numel()
            nbytes += hit[1]
            float_bytes += hit[0].numel() * hit[0].element_size()
        yield {"params": params, "bytes": nbytes, "layers": len(originals),
               "bits_per_param": 8.0 * nbytes / params if params else None,
               "float_bytes": float_bytes}
    finally:
        for name, w in originals.items():
            modules[name].weight = w
