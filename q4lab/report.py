"""``q4lab.report(model)``: what 4-bit quantization did to a model, per layer and in total.

Bytes after are the bytes really stored (``q4lab.state.storage_bytes``: packed codes + absmax +
nested absmax + offset; the shared codebooks are not counted), bytes before are the same weights in
their original dtype, and bits/param is 8 * bytes / params (QLoRA, arXiv 2305.14314 §3 "Double
Quantization": 4.5 -> ~4.127 bits at blocksize 64). The ratio over the 4-bit layers alone
(32 / 4.127 = 7.75x from float32) is not what the model shrinks by: embeddings, norms and skipped
layers (lm_head) keep their dtype, so the summary also gives the whole model's bytes before and
after (``model_bytes``: every distinct parameter and buffer once). Reconstruction error (MSE,
max |error|, SQNR = 10 log10(sum w^2 / sum e^2) dB) needs the original weights: kept at quantize
time (``quantize_model(..., keep_error_stats=True)``) or passed as ``reference=`` (the original
model, its state dict, or {layer name: weight}). Displays as an HTML table in a notebook, text
elsewhere.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .constants import DTYPE_BYTES
from .metrics import error_stats
from .nn import Linear4bit
from .state import storage_bytes
_COLUMNS = (("layer", "{}"), ("shape", "{}"), ("quant", "{}"), ("params", "{:,}"),
            ("bytes_before", "{:,}"), ("bytes_after", "{:,}"), ("bits_per_param", "{:.3f}"),
            ("mse", "{:.3e}"), ("max_abs_err", "{:.3e}"), ("sqnr_db", "{:.2f}"))


@dataclass
class Report:
    """Per-layer rows (list of dicts) and a ``total`` dict; ``note`` says anything the numbers
    need to be read with (e.g. the source model was already 4-bit)."""

    rows: list
    total: dict
    note: str = ""
    model_bytes: dict = field(default_factory=dict)

    def _table(self) -> list[list[str]]:
        lines = [[c for c, _ in _COLUMNS]]
        for r in [*self.rows, {"layer": "TOTAL", **self.total}]:
            lines.append([_fmt(r.get(c), f) for c, f in _COLUMNS])
        return lines

    def __str__(self) -> str:
        lines = self._table()
        widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
        text = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                          enumerate(zip(row, widths))) for row in lines]
        text.append(self.summary())
        if self.note:
            text.append(f"Note: {self.note}")
        return "\n".join(text)

    def summary(self) -> str:
        t = self.total
        if not t.get("params"):
            return "no 4-bit layers"
        text = (f"{t['layers']} 4-bit layers, {t['params']:,} params: {t['bytes_before']:,} -> "
                f"{t['bytes_after']:,} bytes ({t['bits_per_param']:.3f} bits/param, "
                f"{t['compression']:.2f}x on these layers)")
        mb = self.model_bytes
        if mb.get("now"):
            text += (f"; whole model {mb['before'] / 1e6:.1f} MB -> {mb['now'] / 1e6:.1f} MB "
                     f"({mb['before'] / mb['now']:.2f}x: what is not 4-bit keeps its dtype)")
        return text

    def _repr_html_(self) -> str:
        head, *body = self._table()
        th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td style='text-align:right'>{html.escape(v)}</td>"
                                       for v in row) + "</tr>" for row in body)
        note = f"<p><b>Note:</b> {html.escape(self.note)}</p>" if self.note else ""
        return (f"<div><table><caption>q4lab report: {html.escape(self.summary())}</caption>"
                f"<thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>{note}</div>")

    def __repr__(self) -> str:
        return f"Report({self.summary()})"


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return spec.format(value)


def _reference_weights(reference) -> dict:
    """{layer name: weight tensor} from a model, a state dict or a {name: weight} dict."""
    if reference is None:
        return {}
    if isinstance(reference, nn.Module):
        return {n: m.weight for n, m in reference.named_modules() if isinstance(m, nn.Linear)}
    if not isinstance(reference, dict):
        raise TypeError(f"reference must be an nn.Module or a dict of tensors, got "
                        f"{type(reference).__name__}")
    out = {}
    for k, v in reference.items():
        out[k[:-len(".weight")] if k.endswith(".weight") else k] = v
    return out


def _row(name: str, layer: Linear4bit, ref_weight) -> dict:
    s = layer.quant_state
    after = sum(storage_bytes(s).values())
    row = {"layer": name, "shape": tuple(s.shape), "params": s.numel,
           "quant": f"{s.quant_type}/{s.blocksize}{'+dq' if s.nested else ''}",
           "dtype": s.dtype, "bytes_before": s.numel * DTYPE_BYTES[s.dtype], "bytes_after": after,
           "bits_per_param": 8.0 * after / s.numel, "parts": storage_bytes(s),
           "mse": None, "max_abs_err": None, "sqnr_db": None}
    stats = getattr(layer, "error_stats", None)
    if ref_weight is not None:
        if tuple(ref_weight.shape) != tuple(s.shape):
            raise ValueError(f"reference weight for {name!r} has shape "
                             f"{tuple(ref_weight.shape)}, the layer {tuple(s.shape)}")
        w_hat = ops.dequantize_4bit(layer.packed, layer.quant_state, torch.float32)
        stats = error_stats(ref_weight.to(w_hat.device), w_hat)
    if stats:
        row.update(stats)
    return row


def _total(rows: list) -> dict:
    params = sum(r["params"] for r in rows)
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    total = {"layers": len(rows), "params": params, "bytes_before": before, "bytes_after": after,
             "bytes_saved": before - after, "quant": "", "shape": "",
             "bits_per_param": 8.0 * after / params if params else None,
             "compression": before / after if after else None}
    if rows and all(r["mse"] is not None for r in rows):
        se = sum(r["mse"] * r["params"] for r in rows)
        total.update(mse=se / params, max_abs_err=max(r["max_abs_err"] for r in rows))
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes the model holds now: every distinct parameter and buffer once (tied weights once),
    4-bit layers included: their packed codes and statistics are parameters (q4lab/storage.py)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _reference_name(name: str, refs: dict) -> str | None:
    """The reference weight's name for a layer: itself, or, for the base of a LoRA adapter
    (``q4lab.add_lora`` wraps ``q_proj`` as ``q_proj.base``), the name it had before wrapping."""
    if name in refs:
        return name
    if name.endswith(".base") and name[: -len(".base")] in refs:
        return name[: -len(".base")]
    return None


def report(model: nn.Module, reference=None, note: str | None = None) -> Report:
    """Per-layer and total memory (bytes before/after, bits/param from the stored bytes) and,
    when the original weights are known, reconstruction error, for every ``Linear4bit`` in
    ``model`` (or ``model`` itself if it is one). ``note`` defaults to ``model.q4lab_note`` (set by
    ``q4lab.models.load_smollm2``: its weights were already 4-bit)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    refs = _reference_weights(reference)
    layers = [(n or "(model)", m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if refs:
        missing = [n for n, _ in layers if _reference_name(n, refs) is None]
        if missing:
            raise ValueError(f"reference has no weight for layers {missing[:5]}")
    rows = [_row(n, m, refs.get(_reference_name(n, refs))) for n, m in layers]
    now = model_bytes(model)
    total = _total(rows)
    mb = {"now": now, "before": now - total["bytes_after"] + total["bytes_before"]}
    return Report(rows, total, note if note is not None else getattr(model, "q4lab_note", ""), mb)
