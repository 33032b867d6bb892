"""q4lab.nn: ``Linear4bit`` (QLoRA's frozen 4-bit base layer), ``Q4Config``, ``quantize_model``
and ``save`` / ``load``.

Sources: bitsandbytes ``nn/modules.py::Linear4bit`` and ``autograd/_functions.py::MatMul4Bit``: the
weight [out_features, in_features] is flattened row-major and quantized; forward dequantizes to the
compute dtype and calls ``F.linear``; backward gives a gradient for the input only (the packed
weight is frozen and never gets one). ``quantize_model`` is the module walk of transformers'
``integrations/bitsandbytes.py::replace_with_bnb_linear`` (skip ``lm_head`` and
``llm_int8_skip_modules``, matched on name components) with QLoRA's defaults (arXiv 2305.14314
§3: NF4, blocksize 64, double quant, bf16 compute). ``save`` / ``load`` write bitsandbytes'
state-dict layout (``interop``) to safetensors (no pickle).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from tqdm.auto import tqdm

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
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute_dtype={compute_dtype!r} is not float32, float16 or bfloat16")
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


# ---- whole-model quantization ------------------------------------------------------------------
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _linear_targets(model: nn.Module, cfg: Q4Config) -> list[str]:
    """Names of the ``nn.Linear`` layers ``cfg`` quantizes, checked up front (dtype, finite
    values) so that a bad layer is reported before anything is replaced. LoRA adapter layers
    (``lora_*``) are never quantized."""
    names = []
    for name, module in model.named_modules(remove_duplicate=False):  # every name of a shared layer
        if not isinstance(module, nn.Linear) or not name:
            continue
        if cfg.skips(name) or any(p.startswith("lora_") for p in name.split(".")):
            continue
        w = module.weight
        if w.numel() < cfg.min_numel:
            continue
        if w.dtype not in ops.TORCH_DTYPES:
            raise TypeError(f"layer {name!r} has a {w.dtype} weight; 4-bit quantization takes "
                            f"float32, float16 or bfloat16 (convert the model first)")
        if w.is_meta:
            raise ValueError(f"layer {name!r} is on the meta device; load its weights first")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {name!r} has NaN or Inf in its weight; cannot quantize")
        names.append(name)
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def error_stats(weight: torch.Tensor, weight_hat: torch.Tensor) -> dict:
    """Reconstruction error of ``weight_hat`` against ``weight`` (both as float32, sums in
    float64): MSE, max |error| and SQNR in dB (10 log10(sum w^2 / sum e^2); inf if exact)."""
    w = weight.detach().float().double()
    err = weight_hat.detach().float().double() - w
    se = float((err * err).sum())
    sw = float((w * w).sum())
    sqnr = float("inf") if se == 0 else (10 * math.log10(sw / se) if sw > 0 else float("-inf"))
    return {"mse": se / w.numel(), "max_abs_err": float(err.abs().max()), "sqnr_db": sqnr}


def quantize_model(model: nn.Module, cfg: Q4Config | None = None, progress: bool = True,
                   keep_error_stats: bool = False, **overrides) -> nn.Module:
    """Replace every eligible ``nn.Linear`` of ``model`` by a :class:`Linear4bit`, in place, on the
    layer's own device; returns ``model``. One layer at a time, dropping each full-precision
    weight once its replacement exists (peak memory ~ model + one layer). Layers already 4-bit are
    left alone, so calling it twice changes nothing. A weight shared by several Linear layers is
    quantized once and its packed bytes shared; a weight tied to an embedding (``lm_head``) stays
    in full precision in the embedding. ``keep_error_stats`` stores the reconstruction error
    (``error_stats``) on each new layer as ``layer.error_stats`` for ``q4lab.report``.
    Keyword ``overrides`` replace fields of ``cfg``: ``quantize_model(m, quant_type="fp4")``."""
    cfg = Q4Config() if cfg is None else cfg
    if not isinstance(cfg, Q4Config):
        raise TypeError(f"cfg must be a q4lab.Q4Config, got {type(cfg).__name__}")
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in fields(Q4Config)})
        if unknown:
            raise TypeError(f"quantize_model got unknown options {unknown}; Q4Config fields are "
                            f"{[f.name for f in fields(Q4Config)]}")
        cfg = replace(cfg, **overrides)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_model replaces layers inside a model and cannot replace a bare "
                        "nn.Linear in place; use q4lab.Linear4bit.from_linear(layer, ...)")
    shared: dict = {}
    replaced: dict = {}  # id(original nn.Linear) -> (original, its Linear4bit): one per module object
    for name in tqdm(_linear_targets(model, cfg), desc="quantizing to 4 bits",
                     disable=not progress, unit="layer"):
        linear = model.get_submodule(name)
        if id(linear) not in replaced:
            replaced[id(linear)] = (linear, _quantize_one(linear, cfg, shared, keep_error_stats))
        set_submodule(model, name, replaced[id(linear)][1])
    return model


def _quantize_one(linear: nn.Linear, cfg: Q4Config, shared: dict,
                  keep_error_stats: bool) -> Linear4bit:
    w = linear.weight
    key = (w.data_ptr(), w.device, tuple(w.shape), w.dtype)
    compute_dtype = cfg.compute_dtype or w.dtype
    if key in shared:
        packed, state = shared[key]
        layer = Linear4bit(linear.in_features, linear.out_features, packed, state, linear.bias,
                           compute_dtype)
    else:
        layer = Linear4bit.from_linear(linear, cfg.blocksize, cfg.quant_type, cfg.double_quant,
                                       compute_dtype, cfg.backend)
        shared[key] = (layer.packed, layer.quant_state)
    if keep_error_stats:
        w_hat = ops.dequantize_4bit(layer.packed, layer.quant_state, torch.float32, cfg.backend)
        layer.error_stats = error_stats(w, w_hat)
    return layer


# ---- save / load (safetensors, bitsandbytes keys) -----------------------------------------------
def save(model: nn.Module, path) -> None:
    """Write ``model``'s state dict to a safetensors file in bitsandbytes' 4-bit layout
    (``q4lab.to_bnb_state_dict``). Tensors shared under several names (tied embeddings) are
    written once; the aliases go into the file's metadata."""
    from safetensors.torch import save_file

    from .interop import to_bnb_state_dict

    state = to_bnb_state_dict(model)
    tensors, aliases = {}, {}
    first: dict = {}
    for k, t in state.items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.device) if t.numel() else None
        if ident is not None and ident in first:
            aliases[k] = first[ident]
            continue
        if ident is not None:
            first[ident] = k
        tensors[k] = t.detach().contiguous().cpu()
    meta = {"format": "pt", "q4lab.format": "bnb-4bit/1", "q4lab.aliases": json.dumps(aliases),
            "q4lab.compute_dtypes": json.dumps(_compute_dtypes(model))}
    save_file(tensors, str(path), metadata=meta)


def _compute_dtypes(model: nn.Module) -> dict:
    return {n: ops.TORCH_DTYPES[m.compute_dtype] for n, m in model.named_modules()
            if isinstance(m, Linear4bit)}


def load(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save` (or any safetensors file of a bitsandbytes 4-bit state
    dict) into ``model``, quantized or not: its ``nn.Linear`` layers stored as 4-bit become
    :class:`Linear4bit`. Everything is checked before the model is touched; a truncated or
    corrupted file, a missing or unexpected key, or a wrong shape or dtype raises ``ValueError``
    and leaves ``model`` unchanged. Returns ``model``."""
    from .interop import from_bnb_state_dict

    tensors, meta = _read_safetensors(path)
    aliases = _json_meta(meta, "q4lab.aliases", path)
    for alias, target in aliases.items():
        if target not in tensors:
            raise ValueError(f"{path}: alias {alias!r} points at missing tensor {target!r}")
        tensors[alias] = tensors[target]
    dtypes = {n: ops.DTYPE_OF_NAME.get(d) for n, d in
              _json_meta(meta, "q4lab.compute_dtypes", path).items()}
    return from_bnb_state_dict(model, tensors, strict=strict, compute_dtypes=dtypes)


def _read_safetensors(path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot read {path} as safetensors (truncated or corrupted?): "
                         f"{exc}") from exc


def _json_meta(meta: dict, key: str, path) -> dict:
    if key not in meta:
        return {}
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: metadata {key!r} must be a JSON object")
    return value
