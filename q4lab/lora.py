"""QLoRA adapters over frozen 4-bit layers: ``add_lora``, merge/unmerge, adapter files, memory.

Sources: LoRA (Hu et al., arXiv 2106.09685) §4.1: h = W0 x + (alpha/r) B A x, A Gaussian/Kaiming
random, B = 0 so training starts from the pretrained function; QLoRA (Dettmers et al., arXiv
2305.14314) §3 eq. (5): Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2 with gradients only for the
adapters, the 4-bit weight dequantized on the fly in forward and backward; PEFT
``tuners/lora/layer.py::LoraLayer`` (``lora_A``/``lora_B`` names, ``kaiming_uniform_(a=sqrt(5))``,
dropout on the adapter input, ``scaling = lora_alpha / r``) and PEFT's safetensors key names
(``<module>.lora_A.weight``). The 4-bit base is ``q4lab.nn.Linear4bit``; its custom autograd
Function gives the input its gradient through the dequantized weight and never stores a gradient
(or a copy) of the packed uint8 weight. Memory accounting (``training_memory``) lives in
``q4lab.lora_memory`` and is re-exported here. Adapter files (PEFT adapter directories and q4lab's
single safetensors file: ``save_adapters``, ``load_adapters``, ``read_adapters``) live in
``q4lab.formats.peft`` and are still served under this module's name.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from importlib import import_module

import torch
from torch import nn

from .nn import Linear4bit
from .quantize import linear_layers, set_submodule

_STASH = "_q4lab_unmerged"  # instance attribute of a merged layer: the LoRALinear4bit it replaced


class LoRALinear4bit(nn.Module):
    """A frozen :class:`Linear4bit` plus a trainable low-rank update (LoRA, QLoRA eq. 5).

    ``y = base(x) + scaling * lora_B(lora_A(dropout(x)))`` with ``lora_A``: r x in (Kaiming-
    uniform, a=sqrt(5), as PEFT), ``lora_B``: out x r (zeros), ``scaling = alpha / r``. The adapters
    live in the base's compute dtype on its device. Because B starts at zero, the adapter adds
    exactly +-0.0 at step 0 and the output equals the base output bit for bit (x + 0.0 == x for
    every float except x = -0.0, which a matmul of real data does not produce)."""

    def __init__(self, base: Linear4bit, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, Linear4bit):
            raise TypeError(f"LoRALinear4bit wraps a q4lab.Linear4bit, got {type(base).__name__}")
        r, alpha, dropout = check_lora_config(r, alpha, dropout)
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dtype, device = base.compute_dtype, base.packed.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a_in = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        delta = self.lora_B(self.lora_A(a_in)) * self.scaling
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32 (out x in): the dense update the adapter represents."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def check_lora_config(r, alpha, dropout) -> tuple[int, float, float]:
    """Validate LoRA hyperparameters; ValueError naming the bad one."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r={r!r} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 \
            or not math.isfinite(alpha):
        raise ValueError(f"LoRA alpha={alpha!r} must be a positive finite number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout={dropout!r} must be in [0, 1)")
    return r, float(alpha), float(dropout)


def _as_targets(target_modules) -> tuple[str, ...]:
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if not isinstance(target_modules, Sequence) or not target_modules \
            or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules={target_modules!r} must be a non-empty sequence of "
                         f"module names (last component such as 'q_proj', or a name suffix)")
    return tuple(target_modules)


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear4bit]:
    """{qualified name: LoRALinear4bit} for every adapter-wrapped layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers (4-bit or not) that are not adapter wrappers or part of one (its base,
    lora_A, lora_B): ``q4lab.quantize.linear_layers`` without the wrappers."""
    return {n: m for n, m in linear_layers(model, every_name=False).items()
            if not isinstance(m, LoRALinear4bit)}


def _no_match_error(model, targets, candidates) -> ValueError:
    quant = sorted({n.rsplit(".", 1)[-1] for n, m in candidates.items()
                    if isinstance(m, Linear4bit)})
    dense = sorted({n.rsplit(".", 1)[-1] for n, m in candidates.items()
                    if not isinstance(m, Linear4bit)})
    done = sorted({n.rsplit(".", 1)[-1] for n in lora_layers(model)})
    return ValueError(
        f"target_modules={list(targets)} matched no q4lab.Linear4bit layer. 4-bit layers in this "
        f"model: {quant or 'none (quantize it first: q4lab.quantize_model)'}; unquantized "
        f"nn.Linear layers: {dense or 'none'}; already wrapped with LoRA: {done or 'none'}")


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules=("q_proj", "v_proj")) -> nn.Module:
    """Wrap every ``Linear4bit`` whose name matches ``target_modules`` in a
    :class:`LoRALinear4bit` and freeze every other parameter (in place; returns ``model``).

    A target matches a module whose qualified name equals it or ends with ``"." + target``
    (so ``"q_proj"``, ``"self_attn.q_proj"`` and full names all work); a bare ``Linear4bit``
    passed as ``model`` is wrapped and the wrapper returned. Raises ValueError if a
    target matches an unquantized ``nn.Linear`` (QLoRA adapts a 4-bit base; quantize first) or if
    nothing matches (the message lists the layer names that exist)."""
    r, alpha, dropout = check_lora_config(r, alpha, dropout)
    targets = _as_targets(target_modules)
    if isinstance(model, Linear4bit):  # a bare layer: wrap it and return the wrapper
        return LoRALinear4bit(model, r, alpha, dropout)
    candidates = _candidates(model)
    matched = {n: m for n, m in candidates.items() if _matches(n, targets)}
    dense = sorted(n for n, m in matched.items() if not isinstance(m, Linear4bit))
    if dense:
        raise ValueError(f"target_modules={list(targets)} matched nn.Linear layers that are not "
                         f"4-bit ({dense[:4]}{' ...' if len(dense) > 4 else ''}); quantize the "
                         f"model first (q4lab.quantize_model) or narrow target_modules")
    if not matched:
        raise _no_match_error(model, targets, candidates)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in matched.items():
        set_submodule(model, name, LoRALinear4bit(layer, r, alpha, dropout))
    return model


# ---- merge / unmerge ------------------------------------------------------------------------
def merge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold each adapter into its layer: W' = dequantize(W_4bit) + (alpha/r) B A.

    The choice made here, explicitly: W' is NOT representable in the 4-bit base, so by default each
    ``LoRALinear4bit`` becomes a plain ``nn.Linear`` holding W' (computed in float32, stored in the
    compute dtype, frozen). Its outputs equal the adapter model's up to float32 rounding of the
    different summation order (x W'^T vs x W^T + s B (A x)). ``requantize=True`` instead stores W'
    as a new 4-bit ``Linear4bit`` (same quant type, blocksize, double quant): small, but LOSSY (the
    adapter's update is mostly smaller than one 4-bit step and a RuntimeWarning says so).

    Either way the replaced ``LoRALinear4bit`` (4-bit base bytes and adapters untouched) is kept on
    the merged layer, so :func:`unmerge_lora` restores the training model exactly. Returns
    ``model`` (or the merged layer when ``model`` itself is a ``LoRALinear4bit``)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("merge_lora: the model has no LoRA adapters (call q4lab.add_lora first)")
    if requantize:
        warnings.warn("merge_lora(requantize=True) re-quantizes W + (alpha/r)BA to 4 bits: lossy; "
                      "the merged model does not reproduce the adapter model's outputs",
                      RuntimeWarning, stacklevel=2)
    for name, layer in layers.items():
        merged = _merged_layer(layer, requantize)
        if not name:
            return merged
        set_submodule(model, name, merged)
    return model


@torch.no_grad()
def _merged_layer(layer: LoRALinear4bit, requantize: bool) -> nn.Module:
    base = layer.base
    weight = base.dequantized_weight(torch.float32) + layer.delta_weight()
    dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                      dtype=base.compute_dtype, device=base.packed.device)
    dense.weight.copy_(weight)
    if base.bias is not None:
        dense.bias.copy_(base.bias)
    dense.requires_grad_(False)
    merged = dense
    if requantize:
        s = base.quant_state
        merged = Linear4bit.from_linear(dense, s.blocksize, s.quant_type, s.nested,
                                        base.compute_dtype)
    merged.__dict__[_STASH] = layer  # plain attribute: not a submodule, not in the state dict
    return merged


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`: put back each original ``LoRALinear4bit`` (its packed 4-bit bytes
    and adapter weights are the very tensors that were there before merging)."""
    if _STASH in model.__dict__:
        return model.__dict__[_STASH]
    merged = [n for n, m in model.named_modules() if _STASH in m.__dict__]
    if not merged:
        raise ValueError("unmerge_lora: no merged LoRA layers found (merge_lora was not applied "
                         "to this model)")
    for name in merged:
        set_submodule(model, name, model.get_submodule(name).__dict__[_STASH])
    return model


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: trainable (the adapters after add_lora), frozen, and 4-bit base
    elements (the weights stored in Linear4bit layers, which are buffers, not parameters)."""
    from .nn import storage_parameter_ids

    skip = storage_parameter_ids(model)  # the 4-bit bytes are counted as base_4bit elements
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in skip)
    base4 = sum(m.quant_state.numel for m in model.modules() if isinstance(m, Linear4bit))
    return {"trainable": trainable, "frozen": frozen, "base_4bit": base4,
            "total": trainable + frozen + base4}


from .lora_memory import TrainingMemory, training_memory  # noqa: E402  (re-export)

# Adapter files moved to q4lab.formats.peft (which imports this module); served from there.
_MOVED = ("save_adapters", "load_adapters", "read_adapters", "adapter_metadata",
          "pair_adapter_tensors", "ADAPTER_FORMAT")


def __getattr__(name):
    if name in _MOVED:
        return getattr(import_module("q4lab.formats.peft"), name)
    raise AttributeError(f"module 'q4lab.lora' has no attribute {name!r}")


# The adapter-file names are served by __getattr__ above (ruff cannot see that: F822).
__all__ = [  # noqa: F822
    "LoRALinear4bit", "add_lora", "merge_lora", "unmerge_lora", "save_adapters", "load_adapters",
    "read_adapters", "lora_layers", "trainable_parameters", "training_memory", "TrainingMemory"]
