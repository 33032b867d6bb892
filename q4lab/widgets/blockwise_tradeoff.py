"""Why blocks, and which blocksize: two figures over every linear layer of a real model.

- :func:`outlier_rows` / :func:`outlier_figure`: one absmax for the whole tensor against one per
  block of 64, per layer, against how far the layer's largest weight sits from the rest
  (max |w| / σ). A single large weight squeezes every other weight of its scale group into the few
  levels near zero; blocks confine the damage to 64 weights.
- :func:`tradeoff_rows` / :func:`tradeoff_figure`: SQNR against the bits per parameter actually
  stored, one point per blocksize, with and without double quantization: what each halving of the
  blocksize costs and buys, and how double quantization moves the whole curve to fewer bits.

Source: QLoRA (arXiv 2305.14314) §2 "Block-wise k-bit Quantization" (the outlier argument) and §3
"Double Quantization"; bits from ``q4lab.state.bits_per_param``. All quantization is
``q4lab.reference``; one scale per tensor is the reference's own block steps
(``blockwise.quantize_blocks`` / ``decode``) with a single block as long as the tensor.
"""
from __future__ import annotations

import numpy as np

from ..reference import blockwise as bw
from ..constants import BLOCKSIZES
from ..metrics import error_stats
from ..state import bits_per_param
from ._common import F32, log_ticks, new_figure, redraw, roundtrip


def per_tensor_roundtrip(x: np.ndarray, quant_type: str = "nf4") -> np.ndarray:
    """Quantize and dequantize ``x`` with ONE absmax for the whole tensor (float32 result)."""
    flat = np.asarray(x, dtype=F32).reshape(-1)
    bs = flat.size + flat.size % 2  # one block holding everything (even: whole bytes)
    packed, absmax = bw.quantize_blocks(flat, bs, quant_type)
    return bw.decode(bw.unpack_nibbles(packed, flat.size), absmax, bs, quant_type).reshape(
        np.shape(x))


def outlier_rows(weights: dict, quant_type: str = "nf4", blocksize: int = 64) -> list[dict]:
    """Per layer: name, max |w| / σ, SQNR with one scale per tensor and with blockwise scales."""
    from tqdm.auto import tqdm

    rows = []
    for name, w in tqdm(weights.items(), desc="one scale vs blocks", leave=False):
        w = np.asarray(w, dtype=F32)
        x_hat, _, _ = roundtrip(w, quant_type, blocksize, False)
        per_tensor = per_tensor_roundtrip(w, quant_type)
        rows.append({"name": name, "peak": float(np.abs(w).max() / w.astype(np.float64).std()),
                     "per_tensor_db": error_stats(w, per_tensor)["sqnr_db"],
                     "blockwise_db": error_stats(w, x_hat)["sqnr_db"]})
    return rows


def outlier_figure(rows: list[dict], blocksize: int = 64):
    """Scatter: SQNR per layer against max|w|/σ (log x), one scale per tensor vs per block."""
    import plotly.graph_objects as go

    peak = [r["peak"] for r in rows]
    names = [r["name"] for r in rows]
    fig = new_figure(height=380, yaxis_title="SQNR (dB, higher is better)")
    traces = [go.Scatter(x=peak, y=[r[k] for r in rows], mode="markers", name=label, text=names,
                         marker=dict(size=9, color=color, symbol=sym),
                         hovertemplate="%{text}<br>max/σ %{x:.1f}: %{y:.2f} dB<extra></extra>")
              for k, label, color, sym in (
                  ("blockwise_db", f"one absmax per {blocksize} weights", "#1f77b4", "circle"),
                  ("per_tensor_db", "one absmax per tensor", "#d62728", "x"))]
    worst = min(rows, key=lambda r: r["per_tensor_db"])
    redraw(fig, traces,
           f"{len(rows)} layers: one scale per tensor down to {worst['per_tensor_db']:.1f} dB, "
           f"blocks {min(r['blockwise_db'] for r in rows):.1f}-"
           f"{max(r['blockwise_db'] for r in rows):.1f} dB",
           xaxis=dict(log_ticks(min(peak), max(peak)),
                      title=dict(text="largest |weight| / σ of the layer (log scale)")))
    return fig


def tradeoff_rows(weights: dict, quant_type: str = "nf4", blocksizes=BLOCKSIZES,
                  double_quant=(True, False)) -> list[dict]:
    """Per layer, blocksize and double-quant setting: SQNR (dB) and stored bits per parameter."""
    from tqdm.auto import tqdm

    rows = []
    jobs = [(n, bs, dq) for n in weights for bs in blocksizes for dq in double_quant]
    for name, bs, dq in tqdm(jobs, desc="layers × blocksizes", leave=False):
        w = weights[name]
        x_hat, _, state = roundtrip(w, quant_type, bs, dq)
        rows.append({"name": name, "blocksize": bs, "double_quant": dq,
                     "bits_per_param": bits_per_param(state),
                     "sqnr_db": error_stats(w, x_hat)["sqnr_db"]})
    return rows


def tradeoff_summary(rows: list[dict]) -> dict:
    """{double_quant: {blocksize: {"bits": median bits/param, "median"/"min"/"max": SQNR}}}."""
    out = {}
    for r in rows:
        out.setdefault(r["double_quant"], {}).setdefault(r["blocksize"], []).append(r)
    return {dq: {bs: {"bits": float(np.median([r["bits_per_param"] for r in rs])),
                      "median": float(np.median([r["sqnr_db"] for r in rs])),
                      "min": min(r["sqnr_db"] for r in rs), "max": max(r["sqnr_db"] for r in rs)}
                 for bs, rs in sorted(by_bs.items())}
            for dq, by_bs in out.items()}


def tradeoff_figure(rows: list[dict], title: str = ""):
    """Median SQNR over layers against the side-information bits per parameter (bits/param − 4:
    absmax, nested absmax, offset) on a log axis, one point per blocksize (labelled), the range
    over layers as error bars, for double quantization on and off. Each halving of the blocksize
    doubles the side information, so the points are evenly spaced."""
    import plotly.graph_objects as go

    summary = tradeoff_summary(rows)
    traces = []
    for dq, color in ((False, "#ff7f0e"), (True, "#1f77b4")):
        if dq not in summary:
            continue
        pts = summary[dq]
        bs = list(pts)
        traces.append(go.Scatter(
            x=[pts[b]["bits"] - 4 for b in bs], y=[pts[b]["median"] for b in bs],
            mode="lines+markers+text", text=[str(b) for b in bs],
            textposition="top right" if dq else "bottom left", marker_color=color,
            name="NF4 + double quant" if dq else "NF4 (float32 absmax)",
            error_y=dict(type="data", symmetric=False,
                         array=[pts[b]["max"] - pts[b]["median"] for b in bs],
                         arrayminus=[pts[b]["median"] - pts[b]["min"] for b in bs],
                         thickness=1, width=3),
            hovertemplate="blocksize %{text}: 4 + %{x:.4f} bits, median %{y:.2f} dB"
                          "<extra></extra>"))
    extra = [r["bits_per_param"] - 4 for r in rows]
    fig = new_figure(height=420, yaxis_title="SQNR (dB): median over layers, bars = min..max")
    redraw(fig, traces, title or "blocksize trade-off: each point is a blocksize (labelled)",
           xaxis=dict(log_ticks(min(extra) * 0.8, max(extra) * 1.25),
                      title=dict(text="bits per parameter beyond the 4-bit codes (log scale): "
                                      "absmax + nested absmax + offset")))
    return fig
