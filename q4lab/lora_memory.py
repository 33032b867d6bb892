"""Memory accounting for (Q)LoRA training: ``training_memory`` (``q4lab.training_memory``).

Source: QLoRA (Dettmers et al., arXiv 2305.14314) §1 and §3: full 16-bit fine-tuning of LLaMA-65B
needs > 780 GB (16-bit weights and gradients + two 32-bit Adam states = 12 bytes/param), QLoRA fits
it in < 48 GB: NF4 base with double quantization (4.127 bits/param at blocksize 64), 16-bit
adapters, 32-bit optimizer states only for the adapters, paged optimizers and gradient
checkpointing. Byte counts: ``q4lab.state.storage_bytes`` (real stored bytes of a quantized model)
and ``storage_bytes_for`` (the same formula for a parameter count);
bitsandbytes ``optim/optimizer.py::Optimizer2State.init_state`` (8-bit states: 1 byte/param/state
plus a float32 absmax per 256 elements; tensors under 4096 elements keep float32 states).

What is counted: frozen base weights, adapter weights, their gradients, optimizer states.
What is NOT: activations (the part gradient checkpointing shrinks; it scales with batch x sequence
x layers), the transient dequantized weight of the layer being computed, framework/CUDA context,
allocator fragmentation and data batches. These are stated on every report.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .constants import DTYPE_BYTES
from .ops import TORCH_DTYPES
from .state import storage_bytes, storage_bytes_for

OPTIMIZERS = ("adamw", "adam", "adamw_8bit", "paged_adamw", "sgd", "sgd_momentum")
#: bitsandbytes' 8-bit optimizer states: one float32 absmax per this many elements, and tensors
#: below ``_8BIT_MIN_NUMEL`` elements keep float32 states (``Optimizer2State.init_state``).
_8BIT_BLOCK, _8BIT_MIN_NUMEL = 256, 4096
NOT_INCLUDED = ("activations (reduced by gradient checkpointing; grow with batch x sequence x "
                "layers), the transient dequantized weight of one layer, framework/CUDA context, "
                "allocator fragmentation, input batches")
_BYTES = {**DTYPE_BYTES, **{d: DTYPE_BYTES[name] for d, name in TORCH_DTYPES.items()}}


def optimizer_bytes(numel: int, optimizer: str) -> int:
    """Optimizer-state bytes for one trainable tensor of ``numel`` elements."""
    if optimizer in ("adamw", "adam", "paged_adamw"):
        return 8 * numel  # exp_avg + exp_avg_sq, float32 (paged: same bytes, may live in CPU RAM)
    if optimizer == "adamw_8bit":
        if numel < _8BIT_MIN_NUMEL:
            return 8 * numel
        return 2 * (numel + 4 * -(-numel // _8BIT_BLOCK))
    if optimizer == "sgd_momentum":
        return 4 * numel
    if optimizer == "sgd":
        return 0
    raise ValueError(f"optimizer={optimizer!r} is unknown; use one of {OPTIMIZERS}")


@dataclass
class TrainingMemory:
    """Bytes for one training setup, by part; ``total`` sums them."""

    label: str
    base: int
    adapters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.base + self.adapters + self.gradients + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {"base": self.base, "adapters": self.adapters, "gradients": self.gradients,
                "optimizer": self.optimizer, "total": self.total}


@dataclass
class TrainingMemoryReport:
    """QLoRA vs a full-precision-base LoRA baseline vs full fine-tuning, same optimizer."""

    qlora: TrainingMemory
    lora_baseline: TrainingMemory
    full_finetune: TrainingMemory
    optimizer: str
    not_included: str = NOT_INCLUDED

    def rows(self) -> list[TrainingMemory]:
        return [self.qlora, self.lora_baseline, self.full_finetune]

    def __repr__(self) -> str:
        head = f"{'setup':<34}{'base':>12}{'adapters':>12}{'grads':>12}{'optim':>12}{'total':>12}"
        lines = [head] + [f"{m.label:<34}" + "".join(f"{_fmt(v):>12}" for v in
                                                       list(m.as_dict().values()))
                          for m in self.rows()]
        return "\n".join(lines + [f"optimizer: {self.optimizer}; not included: "
                                  f"{self.not_included}"])

    def _repr_html_(self) -> str:
        cols = ("base", "adapters", "gradients", "optimizer", "total")
        head = "".join(f"<th>{c}</th>" for c in ("setup",) + cols)
        body = "".join("<tr><td style='text-align:left'>" + m.label + "</td>" +
                       "".join(f"<td>{_fmt(v)}</td>" for v in m.as_dict().values()) + "</tr>"
                       for m in self.rows())
        return (f"<table><caption>training memory ({self.optimizer})</caption><tr>{head}</tr>"
                f"{body}</table><p><small>Not included: {self.not_included}.</small></p>")


def _fmt(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _model_counts(model: nn.Module, baseline_dtype) -> dict:
    """Walk a (quantized, maybe LoRA-wrapped) model: real stored bytes of everything."""
    from .nn import Linear4bit

    quant4 = list({id(m.packed): m for m in model.modules()  # shared weights counted once
                   if isinstance(m, Linear4bit)}.values())
    base4 = sum(sum(storage_bytes(m.quant_state).values()) for m in quant4)
    base4_dense = sum(m.quant_state.numel * _BYTES[baseline_dtype or m.quant_state.dtype]
                      for m in quant4)
    from .nn import storage_parameter_ids

    seen, frozen, trainable = storage_parameter_ids(model), [], []  # 4-bit bytes: counted above
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            (trainable if p.requires_grad else frozen).append(p)
    frozen_bytes = sum(_tensor_bytes(p) for p in frozen)
    frozen_dense = sum(p.numel() * _BYTES.get(baseline_dtype, p.element_size()) for p in frozen)
    return {"base": base4 + frozen_bytes, "base_dense": base4_dense + frozen_dense,
            "trainable": [(p.numel(), p.element_size()) for p in trainable],
            "all_params": sum(m.quant_state.numel for m in quant4) + sum(p.numel() for p in frozen)}


def _arithmetic_counts(counts: Mapping, baseline_dtype, adapter_dtype, quant_type, blocksize,
                       double_quant) -> dict:
    """Counts given as numbers: base_params (quantized), other_params (kept in 16-bit) and
    adapter_params. The 4-bit bytes use the storage rule over the whole base as one tensor."""
    unknown = set(counts) - {"base_params", "other_params", "adapter_params"}
    if unknown or "base_params" not in counts:
        raise ValueError(f"param counts need 'base_params' (and optionally 'other_params', "
                         f"'adapter_params'); got keys {sorted(counts)}")
    n_base, n_other = int(counts["base_params"]), int(counts.get("other_params", 0))
    n_adapt = int(counts.get("adapter_params", 0))
    dense = _BYTES[baseline_dtype]
    return {"base": sum(storage_bytes_for(n_base, blocksize, double_quant).values())
            + n_other * dense,
            "base_dense": (n_base + n_other) * dense,
            "trainable": [(n_adapt, _BYTES[adapter_dtype])] if n_adapt else [],
            "all_params": n_base + n_other}


def training_memory(model_or_param_counts, optimizer: str = "adamw", *, baseline_dtype=None,
                    adapter_dtype="bfloat16", quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> TrainingMemoryReport:
    """Training memory of QLoRA, of LoRA over a full-precision base, and of full fine-tuning.

    ``model_or_param_counts`` is either a model (bytes from its real tensors: the stored 4-bit
    bytes of each ``Linear4bit``, the actual dtype of every other parameter, trainable = params
    with ``requires_grad``) or a mapping ``{"base_params", "other_params", "adapter_params"}`` for
    pure arithmetic (a bare number means base_params; e.g. LLaMA-65B: ``llama_param_counts``;
    ``adapter_dtype``, ``quant_type``, ``blocksize`` and
    ``double_quant`` then describe the setup). Gradients have the trainable parameters' dtype;
    optimizer state per ``optimizer`` (AdamW: two float32 states per trainable parameter).
    The baseline stores the base in ``baseline_dtype`` (default: each quantized layer's original
    dtype for a model, bfloat16 for arithmetic); full fine-tuning trains every parameter in it."""
    optimizer_bytes(0, optimizer)  # validates the name
    if isinstance(model_or_param_counts, nn.Module):
        c = _model_counts(model_or_param_counts, baseline_dtype)
    elif isinstance(model_or_param_counts, (int, float)) and \
            not isinstance(model_or_param_counts, bool) and model_or_param_counts > 0:
        return training_memory({"base_params": int(model_or_param_counts)}, optimizer,
                               baseline_dtype=baseline_dtype, adapter_dtype=adapter_dtype,
                               quant_type=quant_type, blocksize=blocksize,
                               double_quant=double_quant)
    elif isinstance(model_or_param_counts, Mapping):
        c = _arithmetic_counts(model_or_param_counts, baseline_dtype or "bfloat16", adapter_dtype,
                               quant_type, blocksize, double_quant)
        baseline_dtype = baseline_dtype or "bfloat16"
    else:
        raise TypeError(f"training_memory takes an nn.Module or a mapping of parameter counts, "
                        f"got {type(model_or_param_counts).__name__}")
    adapters = sum(n * size for n, size in c["trainable"])
    opt = sum(optimizer_bytes(n, optimizer) for n, _ in c["trainable"])
    qlora = TrainingMemory("QLoRA (4-bit base)", c["base"], adapters, adapters, opt)
    lora = TrainingMemory("LoRA (full-precision base)", c["base_dense"], adapters, adapters, opt)
    n_all = c["all_params"]
    full_size = c["base_dense"]
    full = TrainingMemory("full fine-tuning (no adapters)", full_size, 0, full_size,
                          optimizer_bytes(n_all, optimizer))
    return TrainingMemoryReport(qlora, lora, full, optimizer)


def llama_param_counts(hidden: int, intermediate: int, layers: int, vocab: int, r: int = 64,
                       kv_dim: int | None = None, tied_embeddings: bool = False) -> dict:
    """Parameter counts of a LLaMA-style decoder for :func:`training_memory` arithmetic, with LoRA
    of rank ``r`` on all seven linear layers of every block (QLoRA §4: adapters on all layers).
    base_params: q, k, v, o, gate, up, down weights (quantized); other_params: embeddings, lm_head
    (unless tied) and RMSNorm weights (kept in 16-bit). LLaMA-65B: hidden 8192, intermediate 22016,
    80 layers, vocab 32000 (Touvron et al. 2023, Table 2)."""
    kv = hidden if kv_dim is None else kv_dim
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
              (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    per_layer = sum(o * i for o, i in shapes)
    adapters = sum(r * (o + i) for o, i in shapes)
    embeddings = vocab * hidden * (1 if tied_embeddings else 2)
    norms = hidden * (2 * layers + 1)
    return {"base_params": per_layer * layers, "other_params": embeddings + norms,
            "adapter_params": adapters * layers}
