"""``compute_dtype_explorer(weights)``: what the compute dtype does to a 4-bit layer's output.
The stored 4-bit weight is the same; ``Linear4bit`` dequantizes it to the compute dtype (float32,
float16 or bfloat16, round to nearest even) and multiplies in that dtype.

Source: QLoRA (arXiv 2305.14314) §3 "QLoRA": storage dtype NF4, computation dtype BFloat16;
bitsandbytes ``nn/modules.py::Linear4bit(compute_dtype=...)``. Dequantization is
``q4lab.dequantize_4bit(..., dtype=)`` (DESIGN.md §4.8); inputs are seeded N(0, 1) activations.
"""
from __future__ import annotations

import numpy as np

from ._common import WidgetBase, html_table, linear_weights, new_figure, redraw

DTYPES = ("float32", "float16", "bfloat16")


def output_errors(weight: np.ndarray, dtype: str, tokens: int = 16, seed: int = 0,
                  blocksize: int = 64, quant_type: str = "nf4") -> dict:
    """Relative output errors of y = x @ W^T for one compute dtype, as float64 arrays:
    ``quant`` (4-bit weight in float32 vs original weight: the quantization error) and
    ``compute`` (4-bit weight in ``dtype`` vs in float32: what the compute dtype adds)."""
    import torch

    from .. import ops

    if dtype not in DTYPES:
        raise ValueError(f"compute dtype {dtype!r} is not one of {DTYPES}")
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).reshape(weight.shape[0], -1)
    x = torch.randn(tokens, w.shape[1], generator=torch.Generator().manual_seed(seed))
    packed, state = ops.quantize_4bit(w, blocksize, quant_type, True)
    w32 = ops.dequantize_4bit(packed, state, dtype=torch.float32)
    wd = ops.dequantize_4bit(packed, state, dtype=getattr(torch, dtype))
    y, y32 = x @ w.T, x @ w32.T
    yd = (x.to(wd.dtype) @ wd.T).float()
    scale = float(y.abs().max()) or 1.0
    return {"quant": ((y32 - y) / scale).double().numpy().ravel(),
            "compute": ((yd - y32) / scale).double().numpy().ravel()}


class ComputeDtypeExplorer(WidgetBase):
    """Drive it from Python: ``layer.value``, ``dtype.value``; read ``errors`` and ``fig.data``."""

    def __init__(self, weights, dtype: str = "bfloat16"):
        import ipywidgets as W

        self.weights = linear_weights(weights)
        names = list(self.weights)
        self.layer = W.Dropdown(options=names, value=names[0], description="layer",
                                layout=W.Layout(width="420px"))
        self.dtype = W.ToggleButtons(options=DTYPES, value=dtype, description="compute")
        self.readout = W.HTML()
        self.fig = new_figure(barmode="overlay", height=340, yaxis_type="log",
                              xaxis_title="output error / max |y|", yaxis_title="count")
        for w in (self.layer, self.dtype):
            w.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([self.layer, self.dtype, self.fig, self.readout])
        self.update()

    def update(self) -> None:
        import plotly.graph_objects as go

        self.errors = output_errors(self.weights[self.layer.value], self.dtype.value)
        lim = max(float(np.abs(e).max()) for e in self.errors.values()) or 1e-12
        edges = np.linspace(-lim, lim, 102)
        centres = (edges[:-1] + edges[1:]) / 2
        bars = [go.Bar(x=centres, y=np.histogram(self.errors[k], edges)[0], name=label,
                       opacity=0.6) for k, label in (("quant", "4-bit weight (fp32 compute)"),
                                                     ("compute", f"{self.dtype.value} compute"))]
        redraw(self.fig, bars,
               f"{self.layer.value}: compute dtype {self.dtype.value}")
        rms = {k: float(np.sqrt(np.mean(v * v))) for k, v in self.errors.items()}
        self.readout.value = html_table(
            [("4-bit weight vs original (fp32 compute)", f"{rms['quant']:.3e}"),
             (f"{self.dtype.value} compute vs fp32 compute", f"{rms['compute']:.3e}")],
            ("relative output error (RMS)", "value"))


def compute_dtype_explorer(weights, dtype: str = "bfloat16") -> ComputeDtypeExplorer:
    """Compare float32 / float16 / bfloat16 compute for 4-bit layers of ``weights``."""
    return ComputeDtypeExplorer(weights, dtype)
