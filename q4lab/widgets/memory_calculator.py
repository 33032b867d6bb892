"""``memory_calculator()``: bits per parameter and GB for 7B-70B models in 4-bit, broken down into
codes, absmax, nested absmax and offset, and whether the weights fit a chosen GPU.

Source: QLoRA (arXiv 2305.14314) §3 "Double Quantization": 32/64 = 0.5 bits/param of absmax at
blocksize 64, 8/64 + 32/(64·256) = 0.127 with double quantization (a 0.373-bit saving); the byte
layout is q4lab.state.storage_bytes / bitsandbytes ``QuantState``. :func:`tensor_bytes` counts the
same parts as ``storage_bytes`` (tested against real quantized tensors) without allocating anything,
so it works for a 70B-parameter tensor.
"""
from __future__ import annotations

from ..reference.blockwise import BLOCKSIZES
from ._common import WidgetBase, html_table, new_figure, redraw

#: Nominal parameter counts (the number in the model's name).
MODEL_SIZES = {"7B": 7e9, "13B": 13e9, "33B": 33e9, "65B": 65e9, "70B": 70e9}
GPUS = {"24 GB (RTX 4090)": 24, "48 GB (A6000)": 48, "80 GB (A100/H100)": 80}
PARTS = ("packed", "absmax", "nested_absmax", "offset")
LABELS = {"packed": "4-bit codes", "absmax": "absmax", "nested_absmax": "nested absmax",
          "offset": "offset"}
GB = 1e9


def tensor_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Bytes q4lab stores for ONE quantized tensor of ``numel`` values, by part (the keys of
    ``q4lab.storage_bytes``): packed ceil(n/2); absmax 4 B/block, or 1 B/block when nested;
    nested absmax 4 B per 256 blocks; offset 4 B."""
    numel = int(numel)
    if numel <= 0:
        raise ValueError(f"numel={numel}: a tensor needs at least one value")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not one of {BLOCKSIZES}")
    nblocks = -(-numel // blocksize)
    parts = {"packed": -(-numel // 2), "absmax": (1 if double_quant else 4) * nblocks}
    if double_quant:
        parts["nested_absmax"] = 4 * -(-nblocks // 256)
        parts["offset"] = 4
    return parts


def model_memory(n_params: float, blocksize: int = 64, double_quant: bool = True,
                 gpu_gb: float | None = None) -> dict:
    """Bytes, bits/param and GB for a model's weights stored as one 4-bit tensor per model (the
    per-tensor offset of 4 bytes is the only thing that depends on how the parameters are split).
    Returns {"bytes": parts, "bits": bits/param per part, "bits_per_param", "gb", "fp16_gb",
    "fits"} (``fits`` only with ``gpu_gb``; weights only, no activations or KV cache)."""
    n = int(round(n_params))
    parts = tensor_bytes(n, blocksize, double_quant)
    total = sum(parts.values())
    out = {"bytes": parts, "bits": {k: 8.0 * v / n for k, v in parts.items()},
           "bits_per_param": 8.0 * total / n, "gb": total / GB, "fp16_gb": 2.0 * n / GB}
    if gpu_gb is not None:
        out["fits"] = out["gb"] <= gpu_gb
    return out


class MemoryCalculator(WidgetBase):
    """Drive it from Python: ``model.value`` ('7B' ... '70B' or 'custom' with ``custom.value`` in
    billions), ``blocksize.value``, ``double_quant.value``, ``gpu.value``; read ``result``."""

    def __init__(self, model: str = "65B", blocksize: int = 64, double_quant: bool = True,
                 gpu: int = 48):
        import ipywidgets as W

        self.model = W.Dropdown(options=[*MODEL_SIZES, "custom"], value=model, description="model")
        self.custom = W.FloatText(value=1.0, description="custom (B)")
        self.quant_type = W.ToggleButtons(options=("nf4", "fp4"), value="nf4",
                                          description="type", tooltips=("same bytes",) * 2)
        self.blocksize = W.Dropdown(options=BLOCKSIZES, value=blocksize, description="blocksize")
        self.double_quant = W.Checkbox(value=double_quant, description="double quant")
        self.gpu = W.Dropdown(options=[(k, v) for k, v in GPUS.items()], value=gpu,
                              description="GPU")
        self.readout = W.HTML()
        self.fig = new_figure(barmode="stack", height=340, xaxis_title="bits per parameter",
                              yaxis_visible=False)
        self.gb_fig = new_figure(height=260, xaxis_title="GB of weights")
        for w in (self.model, self.custom, self.quant_type, self.blocksize, self.double_quant,
                  self.gpu):
            w.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([W.HBox([self.model, self.custom]), self.quant_type,
                              W.HBox([self.blocksize, self.double_quant, self.gpu]), self.fig,
                              self.gb_fig, self.readout])
        self.update()

    def n_params(self) -> float:
        if self.model.value != "custom":
            return MODEL_SIZES[self.model.value]
        if not self.custom.value > 0:
            raise ValueError(f"custom model size must be positive, got {self.custom.value} B")
        return self.custom.value * 1e9

    def update(self) -> None:
        """Recompute the breakdown and redraw both figures (batched, re-synced)."""
        import plotly.graph_objects as go

        try:
            n = self.n_params()
        except ValueError as exc:
            self.readout.value = f"<b style='color:#b00'>{exc}</b>"
            return
        r = self.result = model_memory(n, self.blocksize.value, self.double_quant.value,
                                       self.gpu.value)
        bars = [go.Bar(y=["bits/param"], x=[r["bits"].get(p, 0.0)], orientation="h",
                       name=LABELS[p], text=[f"{r['bits'].get(p, 0.0):.4f}"]) for p in PARTS]
        redraw(self.fig, bars,
               (f"{self.quant_type.value.upper()}, blocksize "
                f"{self.blocksize.value}: {r['bits_per_param']:.4f} "
                f"bits/param"))
        self._draw_gb(r)
        self.readout.value = self._html(n, r)

    def _draw_gb(self, r: dict) -> None:
        import plotly.graph_objects as go

        bars = go.Bar(y=["fp16/bf16", "4-bit"], x=[r["fp16_gb"], r["gb"]], orientation="h",
                      marker_color=["#999", "#1f77b4" if r["fits"] else "#d62728"],
                      text=[f"{r['fp16_gb']:.1f} GB", f"{r['gb']:.2f} GB"], showlegend=False)
        redraw(self.gb_fig, [bars],
               f"weights {'fit' if r['fits'] else 'do NOT fit'} a {self.gpu.value} GB GPU "
               f"(dashed line)",
               shapes=[dict(type="line", x0=self.gpu.value, x1=self.gpu.value, y0=-0.5, y1=1.5,
                            line=dict(dash="dash"))])

    def _html(self, n: float, r: dict) -> str:
        rows = [(LABELS[p], f"{r['bytes'][p]:,}", f"{r['bits'][p]:.4f}") for p in r["bytes"]]
        rows.append(("total", f"{sum(r['bytes'].values()):,}", f"{r['bits_per_param']:.4f}"))
        note = ("NF4 and FP4 store the same bytes; compute dtype (bf16/fp16) changes speed and "
                "activation memory, not the stored weights. Weights only: activations, KV cache, "
                "LoRA adapters and optimizer state come on top.")
        return (html_table(rows, ("part", "bytes", "bits/param"),
                           f"{n / 1e9:g}B parameters as one tensor") + f"<p>{note}</p>")


def memory_calculator(model: str = "65B", blocksize: int = 64, double_quant: bool = True,
                      gpu: int = 48) -> MemoryCalculator:
    """Build the calculator (QLoRA's headline: a 65B model's 4-bit weights fit a 48 GB GPU)."""
    return MemoryCalculator(model, blocksize, double_quant, gpu)
