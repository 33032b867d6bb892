"""``compute_dtype_explorer(weights)``: what the compute dtype does to a 4-bit layer's output.
The stored 4-bit weight is the same; ``Linear4bit`` dequantizes it to the compute dtype (float32,
float16 or bfloat16, round to nearest even) and multiplies in that dtype. Also: the three formats'
range and precision from ``torch.finfo`` (:func:`dtype_table`), and matmul speed per dtype measured
on this machine, each result validated against float64 before it is timed (:func:`time_matmuls`).

Source: QLoRA (arXiv 2305.14314) §3 "QLoRA": storage dtype NF4, computation dtype BFloat16;
bitsandbytes ``nn/modules.py::Linear4bit(compute_dtype=...)``. Dequantization is
``q4lab.dequantize_4bit(..., dtype=)`` (docs/format.md §8); inputs are seeded N(0, 1) activations.
Speed: ``torch.utils.benchmark.Timer.blocked_autorange`` (median of repeated runs).
"""
from __future__ import annotations

import numpy as np

from ..constants import DTYPES
from ._common import WidgetBase, hint, html_table, linear_weights, log_ticks, new_figure, redraw

#: Explicit stored mantissa (fraction) bits and exponent bits of each format (IEEE 754 binary32,
#: binary16; bfloat16 = the top 16 bits of binary32).
BITS = {"float32": (8, 23), "float16": (5, 10), "bfloat16": (8, 7)}
COLORS = {"float32": "#7f7f7f", "float16": "#1f77b4", "bfloat16": "#ff7f0e", "quant": "#9467bd"}


def dtype_table() -> list[dict]:
    """Per format: exponent and mantissa bits, largest finite value, smallest normal, and the
    spacing just above 1 (``eps``), from ``torch.finfo``."""
    import torch

    rows = []
    for name in DTYPES:
        fi = torch.finfo(getattr(torch, name))
        e, m = BITS[name]
        rows.append({"dtype": name, "exponent_bits": e, "mantissa_bits": m, "max": float(fi.max),
                     "smallest_normal": float(fi.tiny), "eps": float(fi.eps)})
    return rows


def time_matmuls(m: int = 512, k: int = 1024, n: int = 1024, dtypes=DTYPES,
                 min_run_time: float = 0.3, seed: int = 0) -> dict:
    """Time ``x @ w`` (x: m×k, w: k×n) in each dtype on the CPU. Every result is first checked
    against the float64 product (relative error below 2·eps·sqrt(k), else ValueError), then timed.
    Returns {dtype: {"seconds": median, "gflops": 2mkn / seconds / 1e9, "rel_err": ...}}."""
    import torch
    from torch.utils import benchmark

    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(m, k, generator=g, dtype=torch.float64)
    w64 = torch.randn(k, n, generator=g, dtype=torch.float64)
    exact = x64 @ w64
    out = {}
    for name in dtypes:
        dt = getattr(torch, name)
        x, w = x64.to(dt), w64.to(dt)
        got = (x @ w).double()
        rel = float((got - exact).abs().max() / exact.abs().max())
        if not rel < 2 * torch.finfo(dt).eps * k ** 0.5:
            raise ValueError(f"{name} matmul is wrong before timing: relative error {rel:.3g}")
        t = benchmark.Timer("x @ w", globals={"x": x, "w": w}, num_threads=torch.get_num_threads()
                            ).blocked_autorange(min_run_time=min_run_time)
        out[name] = {"seconds": t.median, "gflops": 2 * m * k * n / t.median / 1e9, "rel_err": rel}
    return out


def time_linear4bit(weight, tokens: int = 256, dtypes=DTYPES, min_run_time: float = 0.3,
                    seed: int = 0) -> dict:
    """Time the forward pass of a ``q4lab.Linear4bit`` holding ``weight`` (NF4, blocksize 64,
    double quant) with each compute dtype on ``tokens`` N(0, 1) inputs. Each output is first
    checked against the float64 product with the same dequantized weight (relative error below
    2·eps·sqrt(in_features), else ValueError). Returns {dtype: {"seconds", "rel_err"}}."""
    import torch
    from torch.utils import benchmark

    from ..nn import Linear4bit

    w = torch.as_tensor(np.ascontiguousarray(weight, dtype=np.float32))
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(tokens, w.shape[1], generator=torch.Generator().manual_seed(seed))
    out = {}
    for name in dtypes:
        dt = getattr(torch, name)
        layer = Linear4bit.from_linear(lin, compute_dtype=dt)
        xd = x.to(dt)
        with torch.no_grad():
            got = layer(xd).double()
            exact = xd.double() @ layer.dequantized_weight(dtype=torch.float32).double().T
        rel = float((got - exact).abs().max() / exact.abs().max())
        if not rel < 2 * torch.finfo(dt).eps * w.shape[1] ** 0.5:
            raise ValueError(f"Linear4bit with {name} compute is wrong before timing: "
                             f"relative error {rel:.3g}")
        t = benchmark.Timer("layer(xd)", globals={"layer": layer, "xd": xd},
                            setup="torch.set_grad_enabled(False)",
                            num_threads=torch.get_num_threads(),
                            ).blocked_autorange(min_run_time=min_run_time)
        out[name] = {"seconds": t.median, "rel_err": rel}
    return out


def speed_figure(times: dict, title: str):
    """Bars of GFLOP/s per dtype (from :func:`time_matmuls`), in the widgets' look."""
    import plotly.graph_objects as go

    fig = new_figure(height=300, xaxis_title="compute dtype",
                     yaxis_title="GFLOP/s (higher is faster)")
    base = times["float32"]["seconds"] if "float32" in times else None
    text = [f"{v['gflops']:.0f}" + (f" ({base / v['seconds']:.1f}× fp32)" if base else "")
            for v in times.values()]
    redraw(fig, [go.Bar(x=list(times), y=[v["gflops"] for v in times.values()], text=text,
                        textposition="outside", marker_color=[COLORS[d] for d in times])],
           title, yaxis_range=[0, 1.2 * max(v["gflops"] for v in times.values())])
    return fig


def output_errors(weight: np.ndarray, dtype: str, tokens: int = 16, seed: int = 0,
                  blocksize: int = 64, quant_type: str = "nf4") -> dict:
    """Relative output errors of y = x @ W^T for one compute dtype, as float64 arrays:
    ``quant`` (4-bit weight in float32 vs original weight: the quantization error) and
    ``compute`` (4-bit weight in ``dtype`` vs in float32: what the compute dtype adds)."""
    import torch

    from .. import ops

    if dtype not in DTYPES:
        raise ValueError(f"compute dtype {dtype!r} is not one of {DTYPES}")
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    w = w.reshape(weight.shape[0], -1)
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
        self.fig = new_figure(barmode="overlay", height=340,
                              xaxis_title="output error / max |y|", yaxis_title="count")
        for w in (self.layer, self.dtype):
            w.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([
            self.layer, self.dtype, self.fig.view,
            hint("<b>Try this:</b> switch between float16 and bfloat16. <b>Look for:</b> what the "
                 "compute dtype adds (blue for float16, orange for bfloat16) is far narrower than "
                 "what 4 bits cost (purple) either way; bfloat16's is wider than float16's "
                 "(7 vs 10 mantissa bits), but bfloat16 keeps float32's range."),
            self.readout])
        self.update()

    def update(self) -> None:
        import plotly.graph_objects as go

        self.errors = output_errors(self.weights[self.layer.value], self.dtype.value)
        lim = max(float(np.abs(e).max()) for e in self.errors.values()) or 1e-12
        edges = np.linspace(-lim, lim, 102)
        centres = (edges[:-1] + edges[1:]) / 2
        counts = {k: np.histogram(self.errors[k], edges)[0] for k in self.errors}
        bars = [go.Bar(x=centres, y=np.where(counts[k] > 0, counts[k], None), name=label,
                       opacity=0.65, marker_color=color)
                for k, label, color in (("quant", "4-bit weight (fp32 compute)", COLORS["quant"]),
                                        ("compute", f"{self.dtype.value} compute",
                                         COLORS[self.dtype.value]))]
        top = max(int(c.max()) for c in counts.values())
        redraw(self.fig, bars, f"{self.layer.value}: compute dtype {self.dtype.value}",
               yaxis=dict(log_ticks(1, max(top, 10)), title=dict(text="count (log scale)")))
        rms = {k: float(np.sqrt(np.mean(v * v))) for k, v in self.errors.items()}
        self.readout.value = html_table(
            [("4-bit weight vs original (fp32 compute)", f"{rms['quant']:.3e}"),
             (f"{self.dtype.value} compute vs fp32 compute", f"{rms['compute']:.3e}")],
            ("relative output error (RMS)", "value"))


def compute_dtype_explorer(weights, dtype: str = "bfloat16") -> ComputeDtypeExplorer:
    """Compare float32 / float16 / bfloat16 compute for 4-bit layers of ``weights``."""
    return ComputeDtypeExplorer(weights, dtype)
