"""``model_dashboard(model)``: every linear layer of a real model, its 4-bit error and its bytes,
as a heatmap (transformer block × layer kind) and a table.

Source: QLoRA (arXiv 2305.14314) §3-4 (NF4 + double quantization of every linear layer of a
transformer); bitsandbytes ``nn/modules.py::Linear4bit``. For a plain model each ``nn.Linear`` is
quantized with ``q4lab.reference``; for a model already converted by ``q4lab.quantize_model`` the
bytes are read from each ``Linear4bit``'s stored state (``q4lab.storage_bytes``) and the error needs
the original weights (``original=`` the plain model or a dict), since a 4-bit layer no longer has
them.
"""
from __future__ import annotations

import re

import numpy as np

from ..constants import BLOCKSIZES
from ..metrics import error_stats
from ..state import bits_per_param, storage_bytes
from ._common import (QUANT_TYPES, WidgetBase, hint, html_table, linear_weights,
                      new_figure, redraw)
from ._common import roundtrip, to_numpy_f32

METRICS = {"sqnr_db": "SQNR (dB)", "mse": "MSE", "bits_per_param": "bits/param",
           "bytes": "bytes stored"}


def _quantized_layers(model) -> dict:
    from ..nn import Linear4bit

    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def layer_table(model, original=None, quant_type: str = "nf4", blocksize: int = 64,
                double_quant: bool = True) -> list[dict]:
    """One row per linear layer: name, shape, numel, bytes, bits_per_param, mse, sqnr_db,
    max_abs_err (error entries are None for a quantized layer without ``original``)."""
    from tqdm.auto import tqdm

    quantized = _quantized_layers(model) if hasattr(model, "named_modules") else {}
    if quantized:
        ref_weights = linear_weights(original) if original is not None else {}
        items = list(quantized.items())
    else:
        items = list(linear_weights(model).items())
    rows = []
    for name, item in tqdm(items, desc="layers", leave=False):
        if quantized:
            rows.append(_quantized_row(name, item, ref_weights.get(name)))
        else:
            rows.append(_plain_row(name, item, quant_type, blocksize, double_quant))
    return rows


def _plain_row(name, x, quant_type, blocksize, double_quant) -> dict:
    x_hat, _, state = roundtrip(x, quant_type, blocksize, double_quant)
    return {"name": name, "shape": tuple(x.shape), "numel": x.size,
            "bytes": sum(storage_bytes(state).values()), "bits_per_param": bits_per_param(state),
            **error_stats(x, x_hat)}


def _quantized_row(name, module, original) -> dict:
    state = module.quant_state
    row = {"name": name, "shape": tuple(state.shape), "numel": state.numel,
           "bytes": sum(storage_bytes(state).values()), "bits_per_param": bits_per_param(state),
           "mse": None, "sqnr_db": None, "max_abs_err": None}
    if original is not None:
        if tuple(original.shape) != tuple(state.shape):
            raise ValueError(f"{name}: original weight has shape {tuple(original.shape)} but the "
                             f"quantized layer has {tuple(state.shape)}")
        w_hat = to_numpy_f32(module.dequantized_weight(dtype=_float32()), name)
        row.update(error_stats(original, w_hat))
    return row


def _two_lines(label: str) -> str:
    """'self_attn.q_proj' -> 'self_attn<br>q_proj': long tick labels break at their last dot."""
    head, dot, tail = label.rpartition(".")
    return f"{head}<br>{tail}" if dot and len(label) > 10 else label


def _fmt(v: float, metric: str) -> str:
    if not np.isfinite(v):
        return "n/a"
    if metric == "sqnr_db":
        return f"{v:.2f} dB"
    if metric == "bytes":
        return f"{v:,.0f}"
    return f"{v:.3e}" if metric == "mse" else f"{v:.4f}"


def _float32():
    import torch

    return torch.float32


def common_prefix(kinds: list[str]) -> str:
    """The longest dotted prefix ending in '*.' shared by every starred kind ('' if none), e.g.
    'model.layers.*.' for a Llama: the axis title says it once instead of every label."""
    starred = [k for k in kinds if ".*." in f".{k}"]
    if not starred:
        return ""
    parts = [k.split(".") for k in starred]
    n = 0
    while all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
        n += 1
    head = parts[0][:n]
    while head and head[-1] != "*":
        head.pop()
    return ".".join(head) + "." if head else ""


def heatmap_grid(rows: list[dict], metric: str) -> tuple[list, list, np.ndarray]:
    """(row labels, column labels, values): rows = the first integer in a layer name (the
    transformer block), columns = the name with that integer replaced by '*'; NaN where absent.
    Column labels are given in full; :func:`common_prefix` finds what they share."""
    cells = {}
    for r in rows:
        m = re.search(r"\.(\d+)\.", f".{r['name']}.")
        block = int(m.group(1)) if m else -1
        kind = r["name"].replace(f".{block}.", ".*.", 1) if m else r["name"]
        cells[(block, kind)] = np.nan if r[metric] is None else float(r[metric])
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in cells))
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for (b, k), v in cells.items():
        grid[blocks.index(b), kinds.index(k)] = v
    return [("other" if b < 0 else f"block {b}") for b in blocks], kinds, grid


class ModelDashboard(WidgetBase):
    """Drive it from Python: ``metric.value`` and, for a plain model, ``quant_type.value`` /
    ``blocksize.value`` / ``double_quant.value``; read ``rows`` and ``fig.data``."""

    def __init__(self, model, original=None, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True):
        import ipywidgets as W

        self.model, self.original = model, original
        self.is_quantized = bool(hasattr(model, "named_modules") and _quantized_layers(model))
        self.metric = W.Dropdown(options=[(v, k) for k, v in METRICS.items()], value="sqnr_db",
                                 description="metric")
        self.quant_type = W.ToggleButtons(options=QUANT_TYPES, value=quant_type,
                                          description="type", disabled=self.is_quantized)
        self.blocksize = W.Dropdown(options=BLOCKSIZES, value=blocksize, description="blocksize",
                                    disabled=self.is_quantized)
        self.double_quant = W.Checkbox(value=double_quant, description="double quant",
                                       disabled=self.is_quantized)
        self.table = W.HTML()
        self.table_box = W.Accordion(children=[self.table], selected_index=None)
        self.fig = new_figure(height=460, margin=dict(l=80, r=20, t=60, b=90))
        self.metric.observe(lambda _c: self.redraw(), names="value")
        for w in (self.quant_type, self.blocksize, self.double_quant):
            w.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([
            W.HBox([self.metric, self.blocksize, self.double_quant]), self.quant_type,
            self.fig.view,
            hint("<b>Try this:</b> switch the metric between SQNR and bits/param"
                 + ("" if self.is_quantized else ", and the blocksize from 64 to 4096") +
                 ". <b>Look for:</b> the colour bar's range: every layer sits within a few dB of "
                 "the others, so a dark cell is only slightly worse, not broken."),
            self.table_box])
        self.update()

    def update(self) -> None:
        """Recompute every layer's row (with a progress bar), then redraw."""
        self.rows = layer_table(self.model, self.original, self.quant_type.value,
                                self.blocksize.value, self.double_quant.value)
        self.redraw()

    def redraw(self) -> None:
        """Heatmap of the chosen metric and the table (one batched, re-synced update)."""
        import plotly.graph_objects as go

        metric = self.metric.value
        ylabels, kinds, grid = heatmap_grid(self.rows, metric)
        prefix = common_prefix(kinds)
        xlabels = [k[len(prefix):] if k.startswith(prefix) else k for k in kinds]
        z = np.where(np.isnan(grid), None, grid).tolist()
        lo, hi = (float(np.nanmin(grid)), float(np.nanmax(grid))) if np.isfinite(grid).any() \
            else (float("nan"), float("nan"))
        spread = f"{_fmt(lo, metric)} to {_fmt(hi, metric)} (spread {_fmt(hi - lo, metric)})"
        heat = go.Heatmap(z=z, x=xlabels, y=ylabels, colorscale="Viridis",
                          colorbar=dict(title=dict(text=f"{METRICS[metric]}<br>spread<br>"
                                                        f"{_fmt(hi - lo, metric)}")),
                          hovertemplate="%{y}, " + prefix + "%{x}: %{z}<extra></extra>")
        source = "stored state" if self.is_quantized else (
            f"{self.quant_type.value}, blocksize {self.blocksize.value}")
        redraw(self.fig, [heat], f"{METRICS[metric]} per layer ({source}): {spread}",
               xaxis=dict(title=dict(text=f"layer kind ({prefix}…)" if prefix else "layer"),
                          tickangle=0 if len(xlabels) <= 8 else -30, automargin=True,
                          tickvals=xlabels, ticktext=[_two_lines(x) for x in xlabels]),
               yaxis=dict(autorange="reversed", title=dict(text="transformer block")))
        self.table.value = self._html()
        self.table_box.set_title(0, f"table: all {len(self.rows)} layers (click to open)")

    def _html(self) -> str:
        def fmt(v, spec):
            return "n/a" if v is None else format(v, spec)

        rows = [(r["name"], "×".join(map(str, r["shape"])), f"{r['bytes']:,}",
                 f"{r['bits_per_param']:.4f}", fmt(r["mse"], ".3e"), fmt(r["sqnr_db"], ".2f"))
                for r in self.rows]
        total_bytes = sum(r["bytes"] for r in self.rows)
        total_numel = sum(r["numel"] for r in self.rows)
        rows.append(("all layers", f"{total_numel:,} params", f"{total_bytes:,}",
                     f"{8 * total_bytes / total_numel:.4f}", "", ""))
        note = ("" if not self.is_quantized or self.original is not None else
                "<p>Error needs the original weights: pass <code>original=</code>.</p>")
        return html_table(rows, ("layer", "shape", "bytes", "bits/param", "MSE", "SQNR dB"),
                          f"{len(self.rows)} linear layers") + note


def model_dashboard(model, original=None, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> ModelDashboard:
    """Dashboard of a plain model (quantized here with the reference) or a q4lab-quantized one."""
    return ModelDashboard(model, original, quant_type, blocksize, double_quant)
