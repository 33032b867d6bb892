"""``error_histograms(model_or_tensor_or_dict)``: per-layer histograms of the quantization error
for NF4 / FP4 / INT4 at blocksizes 32-4096, with MSE and SQNR readouts, and the chosen layer's
trade-off curve: SQNR against the bits per parameter actually stored, one point per blocksize.

Source: QLoRA (arXiv 2305.14314) §3 (NF4 is information-theoretically optimal for normal data;
smaller blocks give more precise scales) and Dettmers & Zettlemoyer 2023 ("The case for 4-bit
precision", blocksize sweeps). Errors come from ``q4lab.reference`` round trips; only histogram
counts go to the browser (the raw errors of a layer would bloat the widget state,
docs/architecture.md §4 "A widget"). Bits per parameter: ``q4lab.state.bits_per_param``.
"""
from __future__ import annotations

import numpy as np

from ..constants import BLOCKSIZES
from ..metrics import error_stats
from ..state import bits_per_param
from ._common import (QUANT_TYPES, WidgetBase, hint, html_table, linear_weights,
                      new_figure, redraw, roundtrip)

COLORS = {"nf4": "#1f77b4", "fp4": "#d62728", "int4": "#2ca02c"}
BINS = 101


def layer_errors(x: np.ndarray, quant_type: str, blocksize: int, double_quant: bool = True):
    """(error = x_hat - x as float64, stats dict) for one layer and format; the stats hold mse,
    max_abs_err, sqnr_db and the stored bits_per_param."""
    x_hat, _, state = roundtrip(x, quant_type, blocksize, double_quant)
    err = x_hat.astype(np.float64) - np.asarray(x, np.float64)
    return err, {**error_stats(x, x_hat), "bits_per_param": bits_per_param(state)}


def shared_histograms(errors: dict, bins: int = BINS) -> tuple[np.ndarray, dict]:
    """Bin centres and counts per format over ONE common range (so the bars are comparable)."""
    lim = max(float(np.max(np.abs(e))) for e in errors.values()) or 1e-12
    edges = np.linspace(-lim, lim, bins + 1)
    counts = {k: np.histogram(e, bins=edges)[0] for k, e in errors.items()}
    return (edges[:-1] + edges[1:]) / 2, counts


class ErrorHistograms(WidgetBase):
    """Drive it from Python: ``layer.value``, ``blocksize.value``, ``double_quant.value``;
    ``stats[quant_type]`` holds the current readouts, ``sweep[quant_type]`` the MSE per blocksize
    visited (in blocksize order); the lower figure plots SQNR against stored bits/param."""

    def __init__(self, source, blocksize: int = 64, double_quant: bool = True):
        import ipywidgets as W

        self.weights = linear_weights(source)
        self._cache: dict = {}
        names = list(self.weights)
        self.layer = W.Dropdown(options=names, value=names[0], description="layer",
                                layout=W.Layout(width="420px"))
        self.blocksize = W.SelectionSlider(options=BLOCKSIZES, value=blocksize,
                                           description="blocksize", continuous_update=False)
        self.double_quant = W.Checkbox(value=double_quant, description="double quant")
        self.readout = W.HTML()
        self.fig = new_figure(xaxis_title="quantization error (dequantized − original)",
                              yaxis_title="count", barmode="overlay", height=360)
        self.sweep_fig = new_figure(xaxis_title="bits per parameter stored",
                                    yaxis_title="SQNR (dB, higher is better)", height=320)
        for w in (self.layer, self.blocksize, self.double_quant):
            w.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([
            W.HBox([self.layer, self.double_quant]), self.blocksize, self.fig.view, self.readout,
            self.sweep_fig.view,
            hint("<b>Try this:</b> move the blocksize from 32 to 4096 and back. <b>Look for:</b> "
                 "the histograms widen as blocks grow (one absmax serves more weights), and in the "
                 "lower plot each halving of the blocksize buys about half a dB of SQNR for at "
                 "most an eighth of a bit (with double quant); NF4 stays on top.")])
        self.update()

    def _errors(self, name: str, quant_type: str, blocksize: int):
        """(errors, stats); only the stats are cached (errors are layer-sized float64)."""
        err, stats = layer_errors(self.weights[name], quant_type, blocksize,
                                  self.double_quant.value)
        self._cache[(name, quant_type, blocksize, self.double_quant.value)] = stats
        return err, stats

    def update(self) -> None:
        """Recompute the chosen layer at the chosen blocksize and redraw both figures."""
        import plotly.graph_objects as go

        name, bs = self.layer.value, self.blocksize.value
        results = {qt: self._errors(name, qt, bs) for qt in QUANT_TYPES}
        self.stats = {qt: r[1] for qt, r in results.items()}
        centres, counts = shared_histograms({qt: r[0] for qt, r in results.items()})
        bars = [go.Bar(x=centres, y=counts[qt], name=qt.upper(), opacity=0.55,
                       marker_color=COLORS[qt]) for qt in QUANT_TYPES]
        redraw(self.fig, bars,
               f"{name} {self.weights[name].shape}: blocksize {bs}")
        self._update_sweep(name)
        rows = [(qt.upper(), f"{s['mse']:.4e}", f"{s['sqnr_db']:.2f}", f"{s['max_abs_err']:.4e}")
                for qt, s in self.stats.items()]
        self.readout.value = html_table(rows, ("format", "MSE", "SQNR (dB)", "max |error|"),
                                        f"{name}, blocksize {bs}")

    def _update_sweep(self, name: str) -> None:
        import plotly.graph_objects as go

        dq = self.double_quant.value
        done = [bs for bs in BLOCKSIZES if (name, "nf4", bs, dq) in self._cache]
        stats = {qt: [self._cache[(name, qt, bs, dq)] for bs in done] for qt in QUANT_TYPES}
        self.sweep = {qt: [s["mse"] for s in v] for qt, v in stats.items()}
        lines = [go.Scatter(x=[s["bits_per_param"] for s in stats[qt]],
                            y=[s["sqnr_db"] for s in stats[qt]], mode="lines+markers+text",
                            name=qt.upper(), marker_color=COLORS[qt],
                            text=[str(bs) if qt == "nf4" else "" for bs in done],
                            textposition="top center", customdata=done,
                            hovertemplate="blocksize %{customdata}: %{x:.4f} bits, "
                                          "%{y:.2f} dB<extra>" + qt.upper() + "</extra>")
                 for qt in QUANT_TYPES]
        redraw(self.sweep_fig, lines,
               f"{name}: SQNR vs bits/param, one point per blocksize (labels; visited so far)")

    def compute_sweep(self) -> dict:
        """Fill the MSE-vs-blocksize curve of the current layer for every blocksize (with tqdm)."""
        from tqdm.auto import tqdm

        name = self.layer.value
        for bs in tqdm(BLOCKSIZES, desc=f"blocksizes of {name}"):
            for qt in QUANT_TYPES:
                if (name, qt, bs, self.double_quant.value) not in self._cache:
                    self._errors(name, qt, bs)
        self._update_sweep(name)
        return self.sweep


def error_histograms(model_or_tensor_or_dict, blocksize: int = 64,
                     double_quant: bool = True) -> ErrorHistograms:
    """Error histograms for a model's linear layers, one tensor, or a dict of tensors."""
    return ErrorHistograms(model_or_tensor_or_dict, blocksize, double_quant)
