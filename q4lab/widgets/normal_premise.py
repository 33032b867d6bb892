"""``normal_premise(weights)``: does NF4's premise hold on real weights, and is every code used
equally often? (No: and the widget shows why.)

NF4 places its 16 levels at normal quantiles (QLoRA, arXiv 2305.14314, §3 "4-bit NormalFloat"),
so that normally distributed values *scaled by 1.848σ* would fill the gaps between levels with equal
probability. Blockwise quantization scales each block by its OWN absmax instead, and the largest
|value| of 64 normal samples is about 2.5σ, not 1.848σ: the scaled values crowd the middle codes
(each block also puts exactly one value on ±1). On N(0, 1) data at blocksize 64 the codes are used
between about 1.7 % and 9.2 % of the time (entropy 3.88 of 4 bits); MiniLM's 37 real layers
measure 3.78-3.89 bits (3.84 over all their weights together). Everything is computed with
``q4lab.reference``: the scaled values are ``blockwise.scale_blocks`` (what the encoder sees), the
codes are unpacked from the reference's packed bytes.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from .. import reference as ref
from ..reference import blockwise as bw
from ..constants import BLOCKSIZES
from ..reference.codebooks import nf4_derivation
from ._common import F32, WidgetBase, hint, html_table, linear_weights, new_figure, redraw

NORMAL = "N(0, 1) sample (the premise)"
BINS = 81


def scaled_by_block(x: np.ndarray, blocksize: int = 64) -> np.ndarray:
    """x / absmax of its block, exactly as the reference's encoder sees it (float32, the padding
    of a short last block dropped)."""
    flat = np.asarray(x, dtype=F32).reshape(-1)
    blocks = bw.split_blocks(flat, blocksize)
    prescale, recip = bw.reciprocal_scale(bw.block_absmax(blocks))
    return bw.scale_blocks(blocks, prescale, recip).reshape(-1)[: flat.size]


def code_usage(x: np.ndarray, blocksize: int = 64, quant_type: str = "nf4") -> np.ndarray:
    """Fraction of the values stored with each of the 16 codes (from the reference's bytes)."""
    flat = np.asarray(x, dtype=F32).reshape(-1)
    packed, _ = ref.quantize_4bit(flat, blocksize, quant_type, False)
    codes = bw.unpack_nibbles(packed, flat.size)
    return np.bincount(codes, minlength=16) / flat.size


def entropy_bits(freq: np.ndarray) -> float:
    """Shannon entropy in bits of a frequency vector (4.0 = all 16 codes equally often)."""
    p = np.asarray(freq, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def absmax_over_sigma(x: np.ndarray, blocksize: int = 64) -> float:
    """Median over blocks of absmax / σ (σ = the standard deviation of the whole tensor)."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    absmax = bw.block_absmax(bw.split_blocks(flat.astype(F32), blocksize))
    return float(np.median(absmax) / flat.std())


def normal_sample(n: int, seed: int = 0) -> np.ndarray:
    """n float32 samples of N(0, 1) (seeded): the premise NF4 was designed for."""
    return np.random.default_rng(seed).standard_normal(n).astype(F32)


def design_scale() -> float:
    """NF4's design assumption: ±1 is the normal quantile at bitsandbytes' offset, 1.848σ."""
    return float(nf4_derivation()["scale"])


class NormalPremise(WidgetBase):
    """Drive it from Python: ``layer.value`` (a weight name or the N(0, 1) sample),
    ``blocksize.value``; read ``usage`` ({"data", "normal"}: 16 fractions each), ``entropy``,
    ``ratio`` (median absmax/σ) and the two figures."""

    def __init__(self, source, blocksize: int = 64):
        import ipywidgets as W

        self.weights = linear_weights(source)
        names = list(self.weights)
        self.layer = W.Dropdown(options=[*names, NORMAL], value=names[0], description="weights",
                                layout=W.Layout(width="460px"))
        self.blocksize = W.SelectionSlider(options=BLOCKSIZES, value=blocksize,
                                           description="blocksize", continuous_update=False)
        self.readout = W.HTML()
        self.fig = new_figure(height=390, xaxis_title="value / absmax of its block",
                              yaxis_title="density", barmode="overlay",
                              margin=dict(l=60, r=20, t=105, b=50))
        self.usage_fig = new_figure(height=320, xaxis_title="NF4 code (level)",
                                    yaxis_title="% of values", barmode="group")
        for w in (self.layer, self.blocksize):
            w.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([
            W.HBox([self.layer, self.blocksize]), self.fig.view, self.usage_fig.view,
            hint("<b>Try this:</b> pick the N(0, 1) sample, then a real layer; move the blocksize "
                 "from 64 to 4096. <b>Look for:</b> the blue histogram is narrower than the dashed "
                 "design curve (each block's absmax is ~2.5σ, not 1.848σ), so the middle codes are "
                 "used most; larger blocks squeeze the values further inward."),
            self.readout])
        self.update()

    def _data(self) -> np.ndarray:
        if self.layer.value == NORMAL:
            return normal_sample(max(w.size for w in self.weights.values()))
        return self.weights[self.layer.value].reshape(-1)

    def update(self) -> None:
        """Recompute both figures for the chosen weights and blocksize (batched, re-synced)."""
        import plotly.graph_objects as go

        x, bs = self._data(), self.blocksize.value
        gauss = normal_sample(x.size, seed=1)
        self.usage = {"data": code_usage(x, bs), "normal": code_usage(gauss, bs)}
        self.entropy = {k: entropy_bits(v) for k, v in self.usage.items()}
        self.ratio = {"data": absmax_over_sigma(x, bs), "normal": absmax_over_sigma(gauss, bs)}
        edges = np.linspace(-1.0, 1.0, BINS + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        dens = np.histogram(scaled_by_block(x, bs), edges, density=True)[0]
        dens_n = np.histogram(scaled_by_block(gauss, bs), edges, density=True)[0]
        s = design_scale()
        grid = np.linspace(-1, 1, 401)
        levels = ref.nf4_codebook().astype(np.float64)
        label = "N(0, 1) sample" if self.layer.value == NORMAL else self.layer.value
        traces = [
            go.Bar(x=centres, y=dens, name=f"{label}", marker_color="#1f77b4", opacity=0.6),
            go.Scatter(x=centres, y=dens_n, mode="lines", name=f"N(0, 1) data, blocksize {bs}",
                       line=dict(color="black")),
            go.Scatter(x=grid, y=s * norm.pdf(grid * s), mode="lines", line=dict(dash="dash",
                       color="#d62728"), name="NF4's design: absmax = 1.848σ"),
            go.Scatter(x=levels, y=np.zeros(16), mode="markers", name="NF4 levels",
                       marker=dict(symbol="line-ns-open", size=14, color="#333"))]
        redraw(self.fig, traces,
               f"blocksize {bs}: median absmax = {self.ratio['data']:.2f}σ "
               f"(NF4's table assumes {s:.3f}σ)")
        pct = {k: 100 * v for k, v in self.usage.items()}
        bars = [go.Bar(x=[f"{v:+.2f}" for v in levels], y=pct["data"], name=label,
                       marker_color="#1f77b4"),
                go.Bar(x=[f"{v:+.2f}" for v in levels], y=pct["normal"], name="N(0, 1) data",
                       marker_color="#7f7f7f")]
        redraw(self.usage_fig, bars,
               f"code usage {pct['data'].min():.1f}-{pct['data'].max():.1f} %, entropy "
               f"{self.entropy['data']:.2f} of 4 bits (N(0, 1): {self.entropy['normal']:.2f})",
               shapes=[dict(type="line", xref="paper", x0=0, x1=1, y0=6.25, y1=6.25,
                            line=dict(dash="dash", color="#333"))],
               annotations=[dict(xref="paper", x=1, y=6.25, yshift=8, xanchor="right",
                                 showarrow=False, text="equal use: 6.25 %")],
               xaxis=dict(tickangle=-45, title=dict(text="NF4 code (its level)")))
        rows = [(label, f"{self.ratio['data']:.3f}", f"{self.entropy['data']:.3f}",
                 f"{pct['data'].min():.2f} / {pct['data'].max():.2f}"),
                ("N(0, 1) data", f"{self.ratio['normal']:.3f}", f"{self.entropy['normal']:.3f}",
                 f"{pct['normal'].min():.2f} / {pct['normal'].max():.2f}")]
        self.readout.value = html_table(rows, ("data", "median absmax / σ", "entropy (bits)",
                                               "least / most used code (%)"),
                                        f"blocksize {bs}")


def normal_premise(weights, blocksize: int = 64) -> NormalPremise:
    """Real weights against NF4's normal premise: scaled-value histograms and code usage."""
    return NormalPremise(weights, blocksize)
