"""``codebook_explorer()``: NF4, FP4 and uniform INT4 levels over the normal density, the normal
mass between neighbouring NF4 levels shaded (equal on each side of zero: (offset - 1/2)/8 above,
(offset - 1/2)/7 below), the rounding boundaries (midpoints between levels) marked, and NF4's
derivation from the normal quantiles shown step by step.

Source: QLoRA (arXiv 2305.14314) §3 "4-bit NormalFloat Quantization"; the recipe is bitsandbytes
``functional.py::create_normal_map(offset=0.9677083, use_extra_value=True)`` as written down in
``q4lab.reference.codebooks`` (8 positive quantile levels, 7 negative, an exact 0, normalized by the
largest). ``reference.codebooks.nf4_derivation`` returns those steps for any offset (re-exported
here); at 0.9677083 its levels are ``ref.nf4_codebook()`` itself.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from .. import reference as ref
from ..reference.codebooks import NF4_OFFSET, midpoint_thresholds, nf4_derivation
from ._common import WidgetBase, hint, html_table, new_figure, redraw

#: Slider step: one arrow-key press moves the outer levels by a visible few percent. The range is
#: laid out so that bitsandbytes' offset is a point of the slider's grid (13 steps above the min).
OFFSET_STEP = 0.005
OFFSET_RANGE = (NF4_OFFSET - 13 * OFFSET_STEP, NF4_OFFSET + 5 * OFFSET_STEP)


def density_curve(scale: float, points: int = 401) -> tuple[np.ndarray, np.ndarray]:
    """x in [-1.1, 1.1] and the N(0, 1) density in normalized units: weights w ~ N(0, 1) seen as
    w / scale, so the density is scale * pdf(x * scale)."""
    x = np.linspace(-1.1, 1.1, points)
    return x, scale * norm.pdf(x * scale)


def bin_shapes(levels: np.ndarray, scale: float) -> list[tuple[float, float, float]]:
    """(left, right, probability mass) of the GAP between each pair of neighbouring NF4 levels
    (not a rounding bin: rounding sends a weight to the nearest level, so a code's bin runs from
    midpoint to midpoint). The masses are the quantile steps, equal on each side of zero but not
    across it: (offset - 0.5)/8 = 0.0585 above 0 and (offset - 0.5)/7 = 0.0668 below."""
    edges = np.asarray(levels, dtype=np.float64)
    cdf = norm.cdf(edges * scale)
    return [(edges[i], edges[i + 1], cdf[i + 1] - cdf[i]) for i in range(edges.size - 1)]


class CodebookExplorer(WidgetBase):
    """Drive it from Python: ``ex.offset.value = 0.95`` recomputes the NF4 levels and the figure;
    ``ex.levels`` holds the current NF4 table; ``ex.fig.data`` the traces."""

    def __init__(self, offset: float = NF4_OFFSET):
        import ipywidgets as W

        self.offset = W.FloatSlider(value=offset, min=OFFSET_RANGE[0], max=OFFSET_RANGE[1],
                                    step=OFFSET_STEP, readout_format=".7f",
                                    description="NF4 offset",
                                    continuous_update=False, layout=W.Layout(width="480px"),
                                    style={"description_width": "90px"})
        self.show_fp4 = W.Checkbox(value=True, description="FP4 levels")
        self.show_int4 = W.Checkbox(value=True, description="uniform INT4 levels")
        self.reset = W.Button(description="bnb offset 0.9677083", layout=W.Layout(width="200px"))
        self.steps = W.HTML()
        self.fig = new_figure(title="4-bit codebooks over the normal density",
                              xaxis_title="normalized weight (w / absmax)",
                              yaxis_title="density", height=500,
                              legend=dict(orientation="h", yanchor="top", y=-0.18))
        for w in (self.offset, self.show_fp4, self.show_int4):
            w.observe(lambda _change: self.update(), names="value")
        self.reset.on_click(lambda _b: setattr(self.offset, "value", NF4_OFFSET))
        self.widget = W.VBox([
            W.HBox([self.offset, self.reset]), W.HBox([self.show_fp4, self.show_int4]),
            self.fig.view,
            hint("<b>Try this:</b> drag the offset slider to its left end, then press the bnb "
                 "button. <b>Look for:</b> a smaller offset pulls the outer levels inward "
                 "(more levels near 0); FP4 crowds its levels near 0 and leaves a wide gap near "
                 "±1, INT4 spaces them evenly."),
            self.steps])
        self.update()

    def update(self) -> None:
        """Recompute everything from the controls and redraw (one batched, re-synced update)."""
        d = nf4_derivation(self.offset.value)
        self.levels = d["levels"]
        traces = self._traces(d)
        redraw(self.fig, traces,
               (f"NF4 at offset {d['offset']:.7f}: "
                f"{self._match_text(d['levels'])}"))
        self.steps.value = self._steps_html(d)

    def _traces(self, d: dict) -> list:
        import plotly.graph_objects as go

        scale = float(d["scale"])
        x, y = density_curve(scale)
        traces = []
        gaps = bin_shapes(d["levels"], scale)
        neg, pos = gaps[0][2], gaps[-1][2]
        for i, (lo, hi, mass) in enumerate(gaps):
            xs = np.linspace(lo, hi, 40)
            traces.append(go.Scatter(x=xs, y=scale * norm.pdf(xs * scale), fill="tozeroy",
                                     mode="none", showlegend=i == 0, legendgroup="bins",
                                     name=(f"normal mass between levels: {pos:.4f} above 0, "
                                           f"{neg:.4f} below"),
                                     fillcolor=("rgba(31,119,180,0.25)" if i % 2 else
                                                "rgba(31,119,180,0.10)"),
                                     hovertemplate=f"mass {mass:.5f}<extra></extra>"))
        traces.append(go.Scatter(x=x, y=y, name="N(0,1) / max level", line=dict(color="black")))
        mids = midpoint_thresholds(d["levels"]).astype(np.float64)
        traces.append(go.Scatter(x=np.repeat(mids, 3), y=np.tile([0.0, 0.12, None], mids.size),
                                 mode="lines", line=dict(color="rgba(0,0,0,0.45)", dash="dot"),
                                 name="rounding boundaries (midpoints)", hoverinfo="skip"))
        traces.append(self._levels_trace("NF4", d["levels"], 0.0, "#1f77b4"))
        if self.show_fp4.value:
            traces.append(self._levels_trace("FP4", np.sort(ref.fp4_codebook()), -0.07, "#d62728"))
        if self.show_int4.value:
            traces.append(self._levels_trace("INT4 (uniform)", ref.int4_codebook()[:15], -0.14,
                                             "#2ca02c"))
        return traces

    @staticmethod
    def _levels_trace(name: str, levels: np.ndarray, y: float, color: str):
        import plotly.graph_objects as go

        v = np.asarray(levels, dtype=np.float64)
        return go.Scatter(x=v, y=np.full(v.size, y), mode="markers", name=name,
                          marker=dict(symbol="line-ns-open", size=16, color=color,
                                      line=dict(width=2, color=color)),
                          hovertemplate="%{x:.7f}<extra>" + name + "</extra>")

    @staticmethod
    def _match_text(levels: np.ndarray) -> str:
        same = np.array_equal(levels.view(np.uint32), ref.nf4_codebook().view(np.uint32))
        if same:
            return "bit-identical to the shipped NF4 table"
        return "differs from the shipped table"

    @staticmethod
    def _steps_html(d: dict) -> str:
        rows = [(f"p = {p:.7f}", f"z = ppf(p) = {z:+.7f}") for p, z in zip(d["p_pos"], d["z_pos"])]
        rows += [(f"p = {p:.7f}", f"z = -ppf(p) = {z:+.7f}")
                 for p, z in zip(d["p_neg"], d["z_neg"])]
        steps = html_table(rows, ("1. quantile level (float32 linspace)", "2. normal quantile"),
                           "Steps 1-2: 8 levels linspace(offset, 0.5, 9)[:-1] above zero, "
                           "7 levels linspace(offset, 0.5, 8)[:-1] below")
        levels = ", ".join(f"{v:+.7f}" for v in d["levels"])
        why = ("<p><b>Why an offset at all?</b> The outermost level cannot sit at probability 1: "
               "norm.ppf(1) = +inf (and norm.ppf(0) = -inf). bitsandbytes stops at "
               "p = 0.9677083, which equals &frac12;((1 - 1/30) + (1 - 1/32)) = 0.96770833 to the "
               "7 digits it gives: the mean of the last bin centre of 15 and of 16 equal-mass bins "
               "(an observation; bitsandbytes does not document the number).</p>")
        return (why + steps + f"<p><b>3.</b> add an exact 0, sort, divide by the largest "
                f"z = {float(d['scale']):.7f} (float32):</p><p style='font-family:monospace'>"
                f"[{levels}]</p>")


def codebook_explorer(offset: float = NF4_OFFSET) -> CodebookExplorer:
    """Build the explorer; display ``.widget`` (a notebook shows it when it is a cell's value)."""
    return CodebookExplorer(offset)
