"""q4lab.quantize: ``quantize_model``, the walk that turns a model's ``nn.Linear`` layers into
:class:`q4lab.nn.Linear4bit`, in place; and ``set_submodule``.

Source: transformers ``integrations/bitsandbytes.py::replace_with_bnb_linear`` (skip ``lm_head`` and
``llm_int8_skip_modules``, matched on name components) with QLoRA's defaults (arXiv 2305.14314 §3:
NF4, blocksize 64, double quant, bf16 compute), held in :class:`q4lab.nn.Q4Config`. The layer itself
is in ``q4lab.nn``; files (``save`` / ``load``) in ``q4lab.formats.safetensors_file``; error numbers
in ``q4lab.metrics``. docs/architecture.md describes how these modules depend on each other.
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import nn

from tqdm.auto import tqdm

from . import ops
from .metrics import error_stats
from .nn import Linear4bit, Q4Config


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
    replaced: dict = {}  # id(original nn.Linear) -> (original, its Linear4bit): one per module
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
