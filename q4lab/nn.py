"""q4lab.nn: ``Linear4bit`` (QLoRA's frozen 4-bit base layer) and ``Q4Config`` (how to quantize).

Sources: bitsandbytes ``nn/modules.py::Linear4bit`` and ``autograd/_functions.py::MatMul4Bit``: the
weight [out_features, in_features] is flattened row-major and quantized; forward dequantizes to the
compute dtype and calls ``F.linear``, except for inputs of a few rows (decoding), where it runs the
fused ``q4lab.matmul_4bit`` on the packed bytes (bitsandbytes: ``gemv_4bit``); backward gives a
gradient for the input only (the packed weight is frozen and never gets one). ``Q4Config`` holds
QLoRA's defaults (arXiv 2305.14314 §3: NF4, blocksize 64, double quant, bf16 compute).

One job per module (docs/architecture.md): the model walk ``quantize_model`` is in
``q4lab.quantize``, ``save`` / ``load`` in ``q4lab.formats.safetensors_file``, ``error_stats`` in ``q4lab.metrics``.
This module imports none of them; ``q4lab.nn.quantize_model`` etc. still resolve, lazily, through
the module ``__getattr__`` at the end (PEP 562), so no import circle exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn

from . import matmul as fused_matmul
from . import ops
from .reference.api import check_blocksize, check_quant_type
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
    ``packed`` is a uint8 buffer (in the state dict); ``quant_state`` is a plain attribute that
    ``.to()`` moves with it. ``q4lab.save`` / ``q4lab.to_bnb_state_dict`` write both in
    bitsandbytes' keys."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor,
                 state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if compute_dtype not in ops.TORCH_DTYPES:
            raise TypeError(f"compute_dtype={compute_dtype!r} is not one of "
                            f"{tuple(ops.TORCH_DTYPES)}")
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

    #: Which matmul ``forward`` runs: "auto" (the fused kernel when autograd is off, as in
    #: ``generate``, for inputs of at most ``q4lab.matmul.fused_max_rows()`` rows where a native
    #: kernel is available; dequantize + ``F.linear`` otherwise, so training computes exactly what
    #: it always did), "fused" or "dequantize" (forced, e.g. to compare them). Settable per layer
    #: or on the class.
    matmul_path: str = "auto"

    def uses_fused(self, x: torch.Tensor) -> bool:
        """True if ``forward(x)`` runs the fused matmul (``q4lab.matmul_4bit``)."""
        path = self.matmul_path
        if path not in ("auto", "fused", "dequantize"):
            raise ValueError(f"matmul_path={path!r} is not 'auto', 'fused' or 'dequantize'")
        if path != "auto":
            return path == "fused"
        if torch.is_grad_enabled():
            return False
        rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 1
        return (ops.kernel_status(x.device.type) is True
                and rows <= fused_matmul.fused_max_rows(x.device.type))

    def _kernel_args(self) -> tuple:
        """The fused kernel's weight arguments, cached in the layer by ``q4lab.matmul.decode_args``
        (rebuilt when ``packed`` or ``quant_state`` is replaced or ``packed`` is written in place;
        the decode layout copy it may hold is described there)."""
        return fused_matmul.decode_args(self, self.packed, self.quant_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        x = x.to(self.compute_dtype)
        if self.uses_fused(x):  # decode: read the 4-bit bytes once, never dequantize
            y = fused_matmul.linear_forward(x, self.packed, self.quant_state,
                                            fused_matmul.decode_bias(self, bias),
                                            self._kernel_args())
        else:                   # prefill / training: dequantize once, one float matmul
            y = _DequantMatmul.apply(x, self.packed, self.quant_state, bias)
        return y.to(in_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """``load_state_dict`` can carry only ``packed`` (the quantization state is not a tensor
        attribute); other codes would be paired with this layer's absmax and silently decode to
        wrong weights, so they are refused with the way to load them. Identical codes load."""
        key = prefix + "packed"
        theirs = state_dict.get(key)
        if isinstance(theirs, torch.Tensor) and not (
                theirs.dtype == self.packed.dtype and theirs.shape == self.packed.shape
                and torch.equal(theirs.to(self.packed.device), self.packed)):
            error_msgs.append(
                f"{key}: a Linear4bit's state dict holds only its packed 4-bit codes, not their "
                f"absmax and the rest of the quantization state, so other codes cannot be loaded "
                f"into it; load 4-bit weights with q4lab.from_bnb_state_dict(model, "
                f"q4lab.to_bnb_state_dict(source)) or q4lab.save / q4lab.load")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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


# ---- how to quantize a model --------------------------------------------------------------------
COMPUTE_DTYPES = tuple(ops.TORCH_DTYPES)


@dataclass
class Q4Config:
    """How ``quantize_model`` quantizes: QLoRA's defaults (NF4, blocksize 64, double quant, bf16
    compute). ``compute_dtype=None`` computes in each weight's own dtype. ``skip_modules`` names
    layers to keep in full precision, matched on module-name components (``"lm_head"``) or dotted
    suffixes (``"attention.output.dense"``); layers with fewer than ``min_numel`` weights are
    kept too (quantizing tiny layers saves nothing and costs accuracy)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = torch.bfloat16
    skip_modules: tuple = ("lm_head",)
    min_numel: int = 4096
    backend: str = "auto"

    def __post_init__(self):
        check_quant_type(self.quant_type)
        self.blocksize = check_blocksize(self.blocksize)
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be True or False, got {self.double_quant!r}")
        if isinstance(self.compute_dtype, str):
            self.compute_dtype = ops.DTYPE_OF_NAME.get(self.compute_dtype.removeprefix("torch."),
                                                       self.compute_dtype)
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype={self.compute_dtype!r} is not one of "
                            f"{COMPUTE_DTYPES} (or None: the weight's own dtype)")
        if isinstance(self.skip_modules, str):
            self.skip_modules = (self.skip_modules,)
        self.skip_modules = tuple(self.skip_modules or ())
        bad = [m for m in self.skip_modules if not isinstance(m, str) or not m]
        if bad:
            raise TypeError(f"skip_modules must be non-empty module-name strings, got {bad!r}")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) \
                or self.min_numel < 0:
            raise ValueError(f"min_numel must be an int >= 0, got {self.min_numel!r}")
        if self.backend not in ops.BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown; use one of {ops.BACKENDS}")

    def skips(self, name: str) -> bool:
        """True if the module called ``name`` matches one of ``skip_modules``."""
        parts = name.split(".")
        for pattern in self.skip_modules:
            if pattern in parts or name == pattern or name.endswith("." + pattern):
                return True
        return False


# Names that lived here before the split, served from their own modules on first access.
_MOVED = {"quantize_model": "quantize", "set_submodule": "quantize", "save": "files",
          "load": "files", "error_stats": "metrics"}


def __getattr__(name):
    if name in _MOVED:
        return getattr(import_module(f"q4lab.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'q4lab.nn' has no attribute {name!r}")
