"""The 4-bit landscape on one real model: every format of ``q4lab.quant_types`` that has a
quantizer, side by side on a causal LM (SmolLM2 in the lab and notebook 12), as plain functions.

Each format is applied by weight round trip: every selected ``nn.Linear`` weight is replaced by
``dequantize_4bit(quantize_4bit(w))`` in float32 (the values a 4-bit kernel would compute with)
and put back on exit, so one float model serves every row. Measured per format, against the
float model on the same tokens:
- perplexity (``q4lab.quality.perplexity``);
- KL divergence KL(p_float || p_4bit) of the next-token distributions, mean over positions
  (log-softmax in float32, sums in float64);
- top-1 agreement: the fraction of positions whose most likely next token is unchanged;
- bits per parameter of the quantized layers from the stored bytes (``q4lab.storage_bytes``).

Sources: QLoRA (arXiv 2305.14314) §3-§4 for NF4 / double quant; OCP MX v1.0 and NVIDIA NVFP4;
ggml's Q4_0 / Q4_1 (docs/formats.md); "equal bits" pairs NF4+DQ at block 64 (4.127 bits) with
NF4 at block 256 (4.125 bits).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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


#: Every quantizable format at its usual setting, plus NF4 at block 256 (the equal-bits partner
#: of NF4+DQ at block 64).
LANDSCAPE = (FormatSpec("nf4", 64, True), FormatSpec("nf4", 256, False),
             FormatSpec("nf4", 64, False), FormatSpec("fp4", 64, False),
             FormatSpec("int4", 64, False), FormatSpec("mxfp4"), FormatSpec("nvfp4"),
             FormatSpec("q4_0"), FormatSpec("q4_1"))
#: Pairs stored in (nearly) the same number of bits, for like-for-like comparisons.
EQUAL_BITS = ((FormatSpec("nf4", 64, True), FormatSpec("nf4", 256, False)),
              (FormatSpec("nf4", 64, False), FormatSpec("nvfp4")),
              (FormatSpec("nf4", 64, False), FormatSpec("q4_0")))


def linear_names(model: nn.Module, lm_head: bool = False) -> list[str]:
    """The names of the linear layers the landscape quantizes (all but lm_head by default)."""
    from .quality import linear_layers, select_layers

    return select_layers(linear_layers(model), "all", lm_head)


@contextmanager
def round_tripped(model: nn.Module, spec: FormatSpec, names: list[str] | None = None):
    """``with round_tripped(model, spec) as info:`` -- the named linear weights replaced by their
    4-bit round trip; ``info`` = {"params", "bytes", "bits_per_param"} of those layers. On exit
    (even after an error) every original weight tensor is put back."""
    from . import dequantize_4bit, quantize_4bit

    names = linear_names(model) if names is None else list(names)
    modules = dict(model.named_modules())
    originals, params, nbytes = {}, 0, 0
    try:
        for name in names:
            layer = modules[name]
            w = layer.weight.data
            packed, state = quantize_4bit(w.float(), spec.blocksize, spec.quant_type,
                                          double_quant=spec.double_quant)
            out = dequantize_4bit(packed, state, torch.float32).to(w.dtype)
            originals[name] = w
            layer.weight.data = out
            params += w.numel()
            nbytes += sum(storage_bytes(state).values())
        yield {"params": params, "bytes": nbytes, "bits_per_param": 8.0 * nbytes / params}
    finally:
        for name, w in originals.items():
            modules[name].weight.data = w


@torch.no_grad()
def log_probs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (positions x vocab), float32, one forward pass."""
    logits = model(input_ids).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1)


def agreement(reference: torch.Tensor, other: torch.Tensor, input_ids: torch.Tensor) -> dict:
    """KL(p_ref || p_other) mean over positions, top-1 agreement, and the perplexity of
    ``other`` on the actual next tokens (all from log-probabilities)."""
    kl = (reference.exp().double() * (reference.double() - other.double())).sum(-1).mean()
    top1 = (reference.argmax(-1) == other.argmax(-1)).double().mean()
    targets = input_ids[0, 1:]
    nll = -other.double().gather(1, targets[:, None]).mean()
    return {"kl": float(kl), "top1": float(top1), "perplexity": math.exp(float(nll))}


def compare(model: nn.Module, input_ids: torch.Tensor, specs=LANDSCAPE, names=None,
            progress: bool = True) -> list[dict]:
    """One row per format (and a first row for the float model): label, quant_type, blocksize,
    bits_per_param, perplexity, kl, top1, family, title."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    reference = log_probs(model, ids)
    rows = [{"label": "float", "quant_type": None, "blocksize": None, "bits_per_param": None,
             **agreement(reference, reference, ids), "family": "float",
             "title": "the source model"}]
    for spec in tqdm(list(specs), desc="formats", disable=not progress):
        with round_tripped(model, spec, names) as info:
            measured = agreement(reference, log_probs(model, ids), ids)
        qt = quant_types.get(spec.quant_type)
        rows.append({"label": spec.label, "quant_type": spec.quant_type,
                     "blocksize": spec.blocksize, "bits_per_param": info["bits_per_param"],
                     **measured, "family": qt.family, "title": qt.title})
    return rows


def table_html(rows: list[dict]) -> str:
    """The comparison as an HTML table (for notebooks)."""
    head = ("<tr><th>format</th><th>family</th><th>bits/param</th><th>perplexity</th>"
            "<th>KL (nats)</th><th>top-1 agreement</th></tr>")
    body = ""
    for r in rows:
        bits = "-" if r["bits_per_param"] is None else f"{r['bits_per_param']:.3f}"
        body += (f"<tr><td>{r['label']}</td><td>{r['family']}</td><td>{bits}</td>"
                 f"<td>{r['perplexity']:.3f}</td><td>{r['kl']:.4f}</td>"
                 f"<td>{100 * r['top1']:.1f} %</td></tr>")
    return f"<table>{head}{body}</table>"
