"""q4lab.nn: ``Linear4bit``, a frozen 4-bit linear layer (QLoRA's base layer).

Source: bitsandbytes ``nn/modules.py::Linear4bit`` and ``autograd/_functions.py::MatMul4Bit``: the
weight [out_features, in_features] is flattened row-major and quantized; forward dequantizes to the
compute dtype and calls ``F.linear``; backward gives a gradient for the input only (the packed
weight is frozen and never gets one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .state import QuantState, bits_per_param


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W^T + b with W = dequantize(packed, state) in x's dtype; dL/dx = dL/dy @ W.
    The dequantized weight is recomputed in backward instead of being stored (QLoRA's memory
    saving: nothing of weight size is kept for the backward pass)."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        weight = ops.dequantize_4bit(packed, state, dtype=x.dtype)
        ctx.packed, ctx.state = packed, state
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ops.dequantize_4bit(ctx.packed, ctx.state, dtype=grad_out.dtype)
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class Linear4bit(nn.Module):
    """A linear layer whose weight is stored as packed 4-bit codes plus a :class:`QuantState`.

    Computes in ``compute_dtype`` (input cast to it, output cast back to the input dtype).
    ``packed`` is a uint8 buffer (saved in the state dict); the state's tensors are buffers too."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor,
                 state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if tuple(state.shape) != (out_features, in_features):
            raise ValueError(f"state shape {tuple(state.shape)} does not match a "
                             f"({out_features}, {in_features}) weight")
        ops.check_state(packed, state)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", packed)
        self.quant_state = state
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) \
            if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    backend: str = "auto") -> "Linear4bit":
        """Quantize an ``nn.Linear``'s weight (on its device) into a new ``Linear4bit``."""
        w = linear.weight.detach()
        packed, state = ops.quantize_4bit(w, blocksize, quant_type, double_quant, backend)
        return cls(linear.in_features, linear.out_features, packed, state,
                   linear.bias, compute_dtype or w.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.dequantize_4bit(self.packed, self.quant_state, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _DequantMatmul.apply(x.to(self.compute_dtype), self.packed, self.quant_state, bias)
        return y.to(in_dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.packed.device
        if self.quant_state.absmax.device != device:
            self.quant_state = self.quant_state.to(device)
        return self

    def extra_repr(self) -> str:
        s = self.quant_state
        dq = ", double_quant" if s.nested else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {s.quant_type}, blocksize={s.blocksize}{dq}, "
                f"{bits_per_param(s):.3f} bits/param, compute_dtype={self.compute_dtype}")
