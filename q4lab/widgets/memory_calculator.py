"""``memory_calculator()``: what a whole model needs on a GPU when its linear layers are 4-bit:
the quantized linear layers (codes, absmax, nested absmax, offset), the embeddings, lm_head and
norms that stay 16-bit, the KV cache of a chosen context, and a runtime allowance; and the bits per
parameter of the quantized layers, plain NF4 (4.5) beside NF4 + double quantization (4.127).

Sources: QLoRA (arXiv 2305.14314) §3 "Double Quantization": 32/64 = 0.5 bits/param of absmax at
blocksize 64, 8/64 + 32/(64·256) = 0.127 with double quantization (a 0.373-bit saving). What stays
16-bit is what transformers' bitsandbytes integration leaves alone: every ``nn.Linear`` inside the
transformer blocks becomes 4-bit, ``lm_head`` is skipped (``get_keys_to_not_convert``), embeddings
and norms are not ``nn.Linear``. Bytes per quantized tensor: ``q4lab.state.storage_bytes_for``
(docs/format.md §11), each linear layer its own tensor. Shapes are the published configs
(``config.json``) of each model; the KV cache is 2 (K and V) × layers × kv_heads × head_dim × tokens
× 2 bytes (fp16/bf16), as in the Llama attention of transformers. The runtime allowance (CUDA
context, allocator slack, activations of one forward pass) is an estimate the user sets, not a
measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..constants import BLOCKSIZES, DTYPE_BYTES
from ..state import storage_bytes_for
from ._common import WidgetBase, hint, html_table, new_figure, redraw

GB = 1e9
PARTS = ("packed", "absmax", "nested_absmax", "offset")
LABELS = {"packed": "4-bit codes", "absmax": "absmax", "nested_absmax": "nested absmax",
          "offset": "offset"}
COLORS = {"packed": "#1f77b4", "absmax": "#ff7f0e", "nested_absmax": "#2ca02c",
          "offset": "#d62728", "embed": "#9467bd", "lm_head": "#8c564b", "norms": "#e377c2",
          "kv": "#7f7f7f", "runtime": "#bcbd22", "linear16": "#17becf"}
GPUS = {"24 GB (RTX 4090)": 24, "48 GB (A6000, L40S)": 48, "80 GB (A100, H100)": 80,
        "141 GB (H200)": 141}


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's shapes (Llama layout: q, k, v, o, gate, up, down per block)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict:
        """{kind: (out, in)} of the seven linear layers of one block (what 4-bit replaces)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def counts(self) -> dict:
        """Parameters by part: linear (inside blocks), embed, lm_head (0 if tied), norms."""
        linear = self.layers * sum(a * b for a, b in self.linear_shapes().values())
        embed = self.vocab * self.hidden
        return {"linear": linear, "embed": embed, "lm_head": 0 if self.tied else embed,
                "norms": (2 * self.layers + 1) * self.hidden}


#: Published configs: LLaMA (Touvron et al. 2023, Table 2, and the HF config.json files),
#: Llama-2-70B (grouped-query attention, 8 KV heads), Llama-3.1-8B (128k vocabulary),
#: SmolLM2-135M (the model of notebooks 06-07; its real parameter count is tested).
ARCHITECTURES = {
    "SmolLM2-135M": Arch(576, 1536, 30, 9, 3, 49152, tied=True),
    "LLaMA-7B": Arch(4096, 11008, 32, 32, 32, 32000),
    "Llama-3.1-8B": Arch(4096, 14336, 32, 32, 8, 128256),
    "LLaMA-13B": Arch(5120, 13824, 40, 40, 40, 32000),
    "LLaMA-33B": Arch(6656, 17920, 60, 52, 52, 32000),
    "LLaMA-65B": Arch(8192, 22016, 80, 64, 64, 32000),
    "Llama-2-70B": Arch(8192, 28672, 80, 64, 8, 32000),
}


def linear_bytes(arch: Arch, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Bytes of all quantized linear layers of ``arch`` by part (each layer its own tensor)."""
    total = dict.fromkeys(PARTS, 0)
    for out_f, in_f in arch.linear_shapes().values():
        for k, v in storage_bytes_for(out_f * in_f, blocksize, double_quant).items():
            total[k] += arch.layers * v
    return total


def model_memory(arch: Arch | str, blocksize: int = 64, double_quant: bool = True,
                 context: int = 2048, batch: int = 1, runtime_gb: float = 1.0,
                 gpu_gb: float | None = None) -> dict:
    """Bytes of the whole model at inference, 4-bit and all-16-bit, by part.

    Returns {"params": counts, "linear": bytes of the quantized linear layers by part,
    "bits": bits per quantized parameter by part, "bits_per_param", "q4": {part: bytes},
    "fp16": {part: bytes}, "q4_gb", "fp16_gb", "weights_gb" (4-bit weights only), "fits"
    (only with ``gpu_gb``)}. Parts of q4/fp16: linear, embed, lm_head, norms, kv, runtime."""
    arch = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    for name, v in (("context", context), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}={v!r} must be an integer >= 0")
    if not runtime_gb >= 0:
        raise ValueError(f"runtime_gb={runtime_gb!r} must be >= 0")
    counts = arch.counts()
    lin = linear_bytes(arch, blocksize, double_quant)
    b16 = DTYPE_BYTES["bfloat16"]
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * int(context) * int(batch) * b16
    rest = {"embed": b16 * counts["embed"], "lm_head": b16 * counts["lm_head"],
            "norms": b16 * counts["norms"], "kv": kv, "runtime": int(runtime_gb * GB)}
    q4 = {"linear": sum(lin.values()), **rest}
    fp16 = {"linear": b16 * counts["linear"], **rest}
    out = {"params": counts, "linear": lin,
           "bits": {k: 8.0 * v / counts["linear"] for k, v in lin.items()},
           "bits_per_param": 8.0 * sum(lin.values()) / counts["linear"],
           "q4": q4, "fp16": fp16, "q4_gb": sum(q4.values()) / GB,
           "fp16_gb": sum(fp16.values()) / GB,
           "weights_gb": (q4["linear"] + rest["embed"] + rest["lm_head"] + rest["norms"]) / GB}
    if gpu_gb is not None:
        out["fits"] = out["q4_gb"] <= gpu_gb
    return out


WHOLE_LABELS = {"linear": "linear layers (16-bit / 4-bit)", "embed": "embeddings (16-bit)",
                "lm_head": "lm_head (16-bit)", "norms": "norms (16-bit)",
                "kv": "KV cache (16-bit)", "runtime": "runtime allowance"}


#: The look of the bits-per-parameter figure (used by the calculator and by notebooks 04 and 06).
BITS_LAYOUT = dict(barmode="stack", height=280, xaxis_title="bits per parameter",
                   margin=dict(l=230, r=30, t=50, b=40),
                   legend=dict(orientation="h", yanchor="top", y=-0.4, traceorder="normal"),
                   yaxis=dict(autorange="reversed"))


def bits_bar(blocksize: int = 64, numel: int = 4096 * 4096) -> tuple[list, dict, dict]:
    """One tensor of ``numel`` NF4 values at ``blocksize``, without and with double quantization,
    as two stacked horizontal bars side by side (codes / absmax / nested absmax / offset; bits per
    parameter from ``storage_bytes_for``). The totals are in the row labels, the saving between the
    bars, and an arrow names the two parts too thin to see. Returns (traces, layout updates for
    ``redraw``, {"plain": bits, "dq": bits, "parts": {"plain": {...}, "dq": {...}}})."""
    import plotly.graph_objects as go

    bits = {k: {part: 8.0 * size / numel
                for part, size in storage_bytes_for(numel, blocksize, k == "dq").items()}
            for k in ("plain", "dq")}
    totals = {k: sum(v.values()) for k, v in bits.items()}
    rows = {"plain": f"NF4: {totals['plain']:.3f} bits",
            "dq": f"NF4 + double quant: {totals['dq']:.3f} bits"}
    traces = []
    for part in PARTS:
        x = [bits[k].get(part, 0.0) for k in rows]
        text = [f"{v:g}" if v > 0.3 else "" for v in x]      # only where it fits
        traces.append(go.Bar(y=list(rows.values()), x=x, orientation="h", name=LABELS[part],
                             marker_color=COLORS[part], text=text, textposition="inside",
                             insidetextanchor="middle", textangle=0,
                             hovertemplate="%{y}: " + LABELS[part]
                             + " %{x:.6f} bits<extra></extra>"))
    nested, offset = bits["dq"]["nested_absmax"], bits["dq"]["offset"]
    right = max(6.2, totals["plain"] * 1.25)
    ann = [dict(x=totals["dq"], y=rows["dq"], axref="x", ayref="y", ax=totals["dq"] + 0.55,
                ay=rows["dq"], showarrow=True, arrowhead=2, arrowwidth=1.2, xanchor="left",
                text=f"absmax codes {bits['dq']['absmax']:.3f}<br>+ nested absmax {nested:.5f}"
                     f"<br>+ offset {offset:.1e} bits",
                font=dict(size=11), align="left"),
           dict(x=totals["plain"] + 0.05, y=0.5, yref="y", xanchor="left", showarrow=False,
                text=f"saving {totals['plain'] - totals['dq']:.3f} bits/param",
                font=dict(color="#555"))]
    return traces, {"annotations": ann, "xaxis_range": [0, right]}, {**totals, "parts": bits}


def bits_figure(blocksize: int = 64, numel: int = 4096 * 4096, title: str | None = None):
    """A new figure holding :func:`bits_bar` (for notebooks)."""
    traces, layout, _ = bits_bar(blocksize, numel)
    fig = new_figure(**BITS_LAYOUT)
    redraw(fig, traces, title or f"bits per parameter of a {numel:,}-value NF4 tensor, "
                                 f"blocksize {blocksize}", **layout)
    return fig


class MemoryCalculator(WidgetBase):
    """Drive it from Python: ``model.value`` (a key of ARCHITECTURES), ``blocksize.value``,
    ``double_quant.value``, ``context.value``, ``batch.value``, ``runtime.value`` (GB),
    ``gpu.value``; read ``result`` (``model_memory``'s dict) and ``bits`` (the bar totals)."""

    def __init__(self, model: str = "LLaMA-65B", blocksize: int = 64, double_quant: bool = True,
                 gpu: int = 48, context: int = 2048, batch: int = 1, runtime_gb: float = 1.0):
        import ipywidgets as W

        if model not in ARCHITECTURES:
            raise ValueError(f"model={model!r} is not one of {list(ARCHITECTURES)}")
        self.model = W.Dropdown(options=list(ARCHITECTURES), value=model, description="model")
        self.blocksize = W.Dropdown(options=BLOCKSIZES, value=blocksize, description="blocksize")
        self.double_quant = W.Checkbox(value=double_quant, description="double quant")
        self.gpu = W.Dropdown(options=list(GPUS.items()), value=gpu, description="GPU")
        self.context = W.IntText(value=context, description="context")
        self.batch = W.IntText(value=batch, description="batch")
        self.runtime = W.FloatText(value=runtime_gb, step=0.25, description="runtime GB")
        self.readout = W.HTML()
        self.fig = new_figure(**BITS_LAYOUT)
        self.gb_fig = new_figure(barmode="stack", height=320, xaxis_title="GB on the GPU",
                                 margin=dict(l=150, r=30, t=50, b=40),
                                 legend=dict(orientation="h", yanchor="top", y=-0.3,
                                             traceorder="normal"),
                                 yaxis=dict(autorange="reversed"))
        for w in (self.model, self.blocksize, self.double_quant, self.gpu, self.context,
                  self.batch, self.runtime):
            w.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([
            W.HBox([self.model, self.gpu]), W.HBox([self.blocksize, self.double_quant]),
            W.HBox([self.context, self.batch, self.runtime]), self.fig.view, self.gb_fig.view,
            hint("<b>Try this:</b> raise the context to 16384, then pick Llama-2-70B; untick "
                 "double quant. <b>Look for:</b> 4.5 vs 4.127 bits side by side; once the weights "
                 "are 4-bit the KV cache (grey) decides whether a long context fits, and "
                 "Llama-2-70B's 8 KV heads make it 8× smaller than LLaMA-65B's 64."),
            self.readout])
        self.update()

    def update(self) -> None:
        """Recompute and redraw both figures (batched, re-synced)."""
        try:
            r = model_memory(self.model.value, self.blocksize.value, self.double_quant.value,
                             self.context.value, self.batch.value, self.runtime.value,
                             self.gpu.value)
        except ValueError as exc:
            self.readout.value = f"<b style='color:#b00'>{exc}</b>"
            return
        self.result = r
        bs = self.blocksize.value
        traces, layout, self.bits = bits_bar(bs)
        redraw(self.fig, traces, f"bits per parameter of a 4096×4096 NF4 layer, blocksize {bs}",
               **layout)
        self._draw_gb(r)
        self.readout.value = self._html(r)

    def _draw_gb(self, r: dict) -> None:
        import plotly.graph_objects as go

        rows = ["all 16-bit", "linear layers 4-bit"]
        bars = []
        for part, label in WHOLE_LABELS.items():
            if part == "linear":
                bars.append(go.Bar(y=rows, x=[r["fp16"]["linear"] / GB, r["q4"]["linear"] / GB],
                                   orientation="h", name=label,
                                   marker_color=[COLORS["linear16"], COLORS["packed"]]))
            else:
                bars.append(go.Bar(y=rows, x=[r["fp16"][part] / GB, r["q4"][part] / GB],
                                   orientation="h", name=label, marker_color=COLORS[part]))
        gpu = self.gpu.value
        fits = r["fits"]
        redraw(self.gb_fig, bars,
               f"{self.model.value}: {r['q4_gb']:.1f} GB in 4-bit, {r['fp16_gb']:.1f} GB in "
               f"16-bit; 4-bit {'fits' if fits else 'does NOT fit'} a {gpu} GB GPU (dashed)",
               shapes=[dict(type="line", x0=gpu, x1=gpu, y0=-0.5, y1=1.5,
                            line=dict(dash="dash", color="#b00" if not fits else "#333"))],
               annotations=[dict(x=max(r[k], gpu), y=row, text=f"{r[k]:.1f} GB", showarrow=False,
                                 xanchor="left", xshift=6)
                            for k, row in (("fp16_gb", rows[0]), ("q4_gb", rows[1]))])

    def _html(self, r: dict) -> str:
        c = r["params"]
        rows = [(WHOLE_LABELS[p], f"{r['fp16'][p] / GB:.3f}", f"{r['q4'][p] / GB:.3f}")
                for p in WHOLE_LABELS]
        rows.append(("total", f"{r['fp16_gb']:.2f}", f"{r['q4_gb']:.2f}"))
        note = (f"{sum(c.values()) / 1e9:.2f} B parameters, {c['linear'] / 1e9:.2f} B of them in "
                f"4-bit linear layers ({100 * c['linear'] / sum(c.values()):.1f} %). KV cache: "
                f"{self.context.value} tokens × batch {self.batch.value}. Inference only: LoRA "
                f"adapters, gradients and optimizer states (training) come on top.")
        return html_table(rows, ("part", "16-bit GB", "4-bit GB"), "Whole model") + \
            f"<p>{note}</p>"


def memory_calculator(model: str = "LLaMA-65B", blocksize: int = 64, double_quant: bool = True,
                      gpu: int = 48, context: int = 2048, batch: int = 1,
                      runtime_gb: float = 1.0) -> MemoryCalculator:
    """Build the calculator (QLoRA's headline: a 65B model's 4-bit weights fit a 48 GB GPU)."""
    return MemoryCalculator(model, blocksize, double_quant, gpu, context, batch, runtime_gb)
