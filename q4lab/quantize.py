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


def is_adapter_wrapper(module: nn.Module) -> bool:
    """A LoRA wrapper around a 4-bit layer (``q4lab.LoRALinear4bit``: a ``base`` Linear4bit plus
    ``lora_A`` / ``lora_B``), recognised without importing ``q4lab.lora`` (which imports this)."""
    return isinstance(getattr(module, "base", None), Linear4bit) and hasattr(module, "lora_A")


def linear_layers(model: nn.Module, every_name: bool = True) -> dict[str, nn.Module]:
    """{name: layer} for every linear layer of ``model``: ``nn.Linear``, ``Linear4bit`` and LoRA
    wrappers, a wrapper as one layer (its ``base``, ``lora_A``, ``lora_B`` are not listed). The one
    walk over layers that quantize_model, save_pretrained, quantize_checkpoint, the PEFT writer
    and add_lora share. ``every_name``: a layer reachable under several names is listed under each
    (``named_modules(remove_duplicate=False)``, as transformers' ``replace_with_bnb_linear``
    walks). ``model`` itself (name "") is not listed."""
    out: dict[str, nn.Module] = {}
    inside: tuple = ()
    for name, module in model.named_modules(remove_duplicate=not every_name):
        if not name or name.startswith(inside):
            continue
        if is_adapter_wrapper(module):
            out[name] = module
            inside += (name + ".",)
        elif isinstance(module, (nn.Linear, Linear4bit)):
            out[name] = module
    return out


def quantize_targets(model: nn.Module, cfg: Q4Config) -> tuple[list[str], list[str]]:
    """The one rule for which layers are quantized: (names of the ``nn.Linear`` layers ``cfg``
    quantizes, names of the other ``nn.Linear`` layers, kept in full precision). Quantized: not
    matched by ``cfg.skip_modules``, not a LoRA adapter layer (a ``lora_*`` name component, as
    PEFT names them), at least ``cfg.min_numel`` weights. Works on a meta-device model (shapes
    only): ``quantize_checkpoint`` decides on one built from ``config.json``."""
    targets, dense = [], []
    for name, module in linear_layers(model).items():
        if not isinstance(module, nn.Linear):
            continue
        adapter = any(p.startswith("lora_") for p in name.split("."))
        if cfg.skips(name) or adapter or module.weight.numel() < cfg.min_numel:
            dense.append(name)
        else:
            targets.append(name)
    return targets, dense


def _checked_targets(model: nn.Module, cfg: Q4Config) -> list[str]:
    """:func:`quantize_targets`, each weight checked up front (dtype, device, finite values) so
    that a bad layer is reported before anything is replaced."""
    names = quantize_targets(model, cfg)[0]
    for name in names:
        w = model.get_submodule(name).weight
        if w.dtype not in ops.TORCH_DTYPES:
            raise TypeError(f"layer {name!r} has a {w.dtype} weight; 4-bit quantization takes "
                            f"float32, float16 or bfloat16 (convert the model first)")
        if w.is_meta:
            raise ValueError(f"layer {name!r} is on the meta device; load its weights first")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {name!r} has NaN or Inf in its weight; cannot quantize")
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
    for name in tqdm(_checked_targets(model, cfg), desc="quantizing to 4 bits",
                     disable=not progress, unit="layer"):
        linear = model.get_submodule(name)
        if id(linear) not in replaced:
            replaced[id(linear)] = (linear, _quantize_one(linear, cfg, shared, keep_error_stats))
        set_submodule(model, name, replaced[id(linear)][1])
    from .decode_groups import link_siblings

    link_siblings(model)  # q/k/v and gate/up decode as one call each (same bytes)
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
