"""q4lab.nn: ``Linear4bit`` (QLoRA's frozen 4-bit base layer) and ``Q4Config`` (how to quantize).

Sources: bitsandbytes ``nn/modules.py::Linear4bit`` and ``autograd/_functions.py::MatMul4Bit``: the
weight [out_features, in_features] is flattened row-major and quantized; forward dequantizes to the
compute dtype and calls ``F.linear``, except for inputs of a few rows (decoding), where it runs the
fused ``q4lab.matmul_4bit`` on the packed bytes (bitsandbytes: ``gemv_4bit``); backward gives a
gradient for the input only (the packed weight is frozen and never gets one). ``Q4Config`` holds
QLoRA's defaults (arXiv 2305.14314 §3: NF4, blocksize 64, double quant, bf16 compute).

One job per module (docs/architecture.md): the model walk ``quantize_model`` is in
``q4lab.quantize``, ``save`` / ``load`` in ``q4lab.formats.safetensors_file``, ``error_stats`` in
``q4lab.metrics``. This module imports none of them; ``q4lab.nn.quantize_model`` etc. still resolve,
lazily, through the module ``__getattr__`` at the end (PEP 562), so no import circle exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn

from . import matmul as fused_matmul
from . import ops
from . import storage
from .reference.api import check_blocksize, check_quant_type
from .state import QuantState, storage_bytes_for


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
    Storage (q4lab/storage.py, docs/distributed.md): ``packed`` is a frozen 1-D ``nn.Parameter``
    holding the ceil(n/2) code bytes in ``quant_storage`` (uint8 by default; bitsandbytes'
    ``quant_storage``: the same bytes viewed as e.g. bf16); ``quant_stats`` is a frozen uint8
    parameter holding absmax / nested absmax / offset as bytes. Being parameters, both are sharded
    by ``torch.distributed.fsdp.fully_shard`` and never cast by a ``MixedPrecisionPolicy`` (bytes).
    ``quant_state`` is a :class:`QuantState` whose tensors are views of ``quant_stats``; assigning
    one copies its bytes in. The state dict holds ``packed`` (and ``bias``) as before;
    ``q4lab.save`` / ``q4lab.to_bnb_state_dict`` write everything in bitsandbytes' keys."""

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
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self._set_packed(packed, state)
        self.quant_state = state
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) \
            if bias is not None else None

    def _set_packed(self, packed: torch.Tensor, state: QuantState) -> None:
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
        dtype = storage.storage_dtype(packed.dtype)
        nbytes = -(-state.numel // 2)
        want = storage.storage_numel(nbytes, dtype)
        if packed.numel() != want or (packed.dim() == 2 and packed.shape[1] != 1) \
                or packed.dim() > 2:
            raise ValueError(f"packed has shape {tuple(packed.shape)} ({packed.dtype}); a "
                             f"{tuple(state.shape)} weight packs into {nbytes} bytes = {want} "
                             f"{str(dtype).removeprefix('torch.')} values, 1-D or ({want}, 1)")
        flat = packed.detach().reshape(-1)
        ops.check_state(storage.as_bytes(flat, nbytes), state)
        if isinstance(packed, nn.Parameter) and packed.dim() == 1 and not packed.requires_grad:
            flat = packed  # the same parameter (a weight shared by several layers stays shared)
        self.quant_storage = dtype
        self.packed = flat

    def load_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Replace the weight by ``packed`` (any storage dtype: it becomes ``quant_storage``)
        and ``state``, checked together before anything changes."""
        old = self._parameters.get("packed"), self.__dict__.get("quant_storage")
        self._set_packed(packed, state)
        try:
            self.quant_state = state
        except (TypeError, ValueError):
            self.packed, self.quant_storage = old
            raise

    def __setattr__(self, name, value):
        if name == "packed" and isinstance(value, torch.Tensor) \
                and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        super().__setattr__(name, value)

    def _weight(self) -> tuple:
        """(packed code bytes as 1-D uint8, QuantState whose tensors are views of
        ``quant_stats``), built once per pair of registered parameters: FSDP registers its
        gathered tensors and the pair is rebuilt from them (views: nothing is copied, and when
        FSDP frees a gathered tensor's storage after forward, nothing here keeps it alive)."""
        params = self._parameters
        packed, stats = params["packed"], params["quant_stats"]
        cached = self.__dict__.get("_weight_cache")
        if cached is not None and cached[0] is packed and cached[1] is stats:
            return cached[2], cached[3]
        for name, t in (("packed", packed), ("quant_stats", stats)):
            if type(t) not in (torch.Tensor, nn.Parameter):
                raise RuntimeError(
                    f"this Linear4bit's {name} is a {type(t).__name__} (sharded by FSDP's "
                    f"fully_shard): the whole 4-bit weight exists only while FSDP has gathered "
                    f"it (inside forward, or within q4lab.distributed.gathered(model))")
        if stats.dtype != torch.uint8:
            raise RuntimeError(f"quant_stats became {stats.dtype}; it must stay uint8 bytes")
        if packed.dtype != self.quant_storage:
            raise RuntimeError(
                f"packed is {packed.dtype} but this layer stores its 4-bit codes as "
                f"{self.quant_storage}: something cast the bytes (FSDP's MixedPrecisionPolicy"
                f"(param_dtype={packed.dtype}) casts float parameters); store them as uint8 "
                f"(quant_storage=torch.uint8, the default) or in the policy's param_dtype")
        template = self._state_template
        packed_bytes = storage.as_bytes(packed, -(-template.numel // 2))
        state = storage.state_from_bytes(template, stats)
        state.__dict__["_stats_parameter"] = stats  # lets another layer share it (tied weights)
        self.__dict__["_weight_cache"] = (packed, stats, packed_bytes, state)
        return packed_bytes, state

    @property
    def quant_state(self) -> QuantState:
        """The :class:`QuantState`; its tensors are views of ``quant_stats`` (the same object
        while the same parameters are registered)."""
        return self._weight()[1]

    @property
    def packed_bytes(self) -> torch.Tensor:
        """The ceil(n/2) packed code bytes as a 1-D uint8 tensor (``packed`` itself when stored
        as uint8, else a view of it)."""
        return self._weight()[0]

    @quant_state.setter
    def quant_state(self, state: QuantState) -> None:
        if not isinstance(state, QuantState):
            raise TypeError(f"expected a q4lab QuantState, got {type(state).__name__}")
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"state shape {tuple(state.shape)} does not match this layer's "
                             f"({self.out_features}, {self.in_features}) weight")
        device = self._parameters["packed"].device
        state = state if state.is_torch and state.absmax.device == device else state.to(device)
        ops.check_state(storage.as_bytes(self._parameters["packed"], -(-state.numel // 2)), state)
        self._state_template = storage.template_of(state)
        self.__dict__.pop("_weight_cache", None)
        shared = state.__dict__.get("_stats_parameter")
        if shared is not None and shared.device == device:  # another layer's: share its bytes
            self.quant_stats = shared
            packed = self._parameters["packed"]
            self.__dict__["_weight_cache"] = (packed, shared, storage.as_bytes(
                packed, -(-state.numel // 2)), state)
        else:
            self.quant_stats = nn.Parameter(storage.stats_to_bytes(state), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    backend: str = "auto", quant_storage=torch.uint8) -> Linear4bit:
        """Quantize an ``nn.Linear``'s weight (on its device) into a new ``Linear4bit``; the codes
        are stored as ``quant_storage`` (uint8, or e.g. torch.bfloat16 as bitsandbytes does)."""
        w = linear.weight.detach()
        packed, state = ops.quantize_4bit(w, blocksize, quant_type, double_quant, backend)
        packed = storage.to_storage(packed, storage.storage_dtype(quant_storage))
        return cls(linear.in_features, linear.out_features, packed, state,
                   linear.bias, compute_dtype or w.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.dequantize_4bit(self.packed_bytes, self.quant_state,
                                   dtype=dtype or self.compute_dtype)

    #: Which matmul ``forward`` runs: "auto" (the fused kernel when autograd is off, as in
    #: ``generate``, for inputs of at most ``q4lab.matmul.fused_max_rows()`` rows where a native
    #: kernel is available; dequantize + ``F.linear`` otherwise, so training computes exactly what
    #: it always did), "fused" or "dequantize" (forced, e.g. to compare them). Settable per layer
    #: or on the class.
    matmul_path: str = "auto"

    def uses_fused(self, x: torch.Tensor) -> bool:
        """True if ``forward(x)`` runs the fused matmul (``q4lab.matmul_4bit``)."""
        path = self.matmul_path
        if path != "auto":
            if path not in ("fused", "dequantize"):
                raise ValueError(f"matmul_path={path!r} is not 'auto', 'fused' or 'dequantize'")
            return path == "fused"
        if torch.is_grad_enabled():
            return False
        rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 1
        return rows <= fused_matmul.auto_fused_rows(x.device.type)

    def _kernel_args(self) -> tuple:
        """The fused kernel's weight arguments, cached in the layer by ``q4lab.matmul.decode_args``
        (rebuilt when ``packed`` or ``quant_state`` is replaced or ``packed`` is written in place;
        the decode layout copy it may hold is described there)."""
        return fused_matmul.decode_args(self, *self._weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this once per layer per token: every step below is skipped when it would do
        # nothing (docs/architecture.md, "Per-call overhead").
        in_dtype, compute = x.dtype, self.compute_dtype
        bias = self.bias
        # The bias is rounded to the compute dtype here, once, and handed on in that dtype on both
        # paths (the fused op widens it itself): torch.compile keeps the rounding (format.md §15).
        if bias is not None and bias.dtype != compute:
            bias = bias.to(compute)
        if in_dtype != compute:
            x = x.to(compute)
        packed, state = self._weight()
        if self.uses_fused(x):  # decode: read the 4-bit bytes once, never dequantize
            group = self.__dict__.get("_q4lab_siblings")  # q/k/v, gate/up: q4lab/decode_groups.py
            y = None if group is None else group.forward(self, x, bias)
            if y is None:
                y = fused_matmul.linear_forward(x, packed, state, bias,
                                                fused_matmul.decode_args(self, packed, state))
        else:                   # prefill / training: dequantize once, one float matmul
            y = _DequantMatmul.apply(x, packed, state, bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

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
        params = self._parameters
        order = list(params)
        stats = params.pop("quant_stats")  # not in the state dict: bitsandbytes' keys carry it
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
        finally:
            params["quant_stats"] = stats
            for name in order:  # the original order, in place
                params[name] = params.pop(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "quant_stats", None)

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.cuda()`` / ``.half()`` move the bytes but never convert them: a
        ``packed`` stored as a float dtype is handed to ``fn`` as its uint8 view."""
        packed = self._parameters["packed"]
        as_float = packed.dtype != torch.uint8 and type(packed) in (torch.Tensor, nn.Parameter)
        if as_float:
            self._parameters["packed"] = nn.Parameter(packed.detach().view(torch.uint8),
                                                      requires_grad=False)
        try:
            super()._apply(fn, recurse)
        finally:
            if as_float:
                moved = self._parameters["packed"].detach()
                self._parameters["packed"] = nn.Parameter(moved.view(self.quant_storage),
                                                          requires_grad=False)
        for key in ("_weight_cache", "_kernel_args_cache"):  # .data may have been swapped
            self.__dict__.pop(key, None)
        device = self._parameters["packed"].device
        t = self._state_template
        if t.code.device != device:
            self._state_template = storage.template_to(t, device)
        return self

    def extra_repr(self) -> str:
        s = self._state_template
        dq = ", double_quant" if s.nested else ""
        bits = 8.0 * sum(storage_bytes_for(s.numel, s.blocksize, s.nested).values()) / s.numel
        store = "" if self.quant_storage == torch.uint8 else f", quant_storage={self.quant_storage}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {s.quant_type}, blocksize={s.blocksize}{dq}, "
                f"{bits:.3f} bits/param, compute_dtype={self.compute_dtype}{store}")


STORAGE_PARAMETERS = ("packed", "quant_stats")


def storage_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that hold 4-bit bytes (``packed``, ``quant_stats`` of every
    ``Linear4bit``): frozen bytes, not weights, which parameter counts leave out."""
    return {id(m._parameters[n]) for m in model.modules() if isinstance(m, Linear4bit)
            for n in STORAGE_PARAMETERS}


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
