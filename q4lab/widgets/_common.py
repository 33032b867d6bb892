"""Shared glue for the q4lab widgets: weight collection, reference round trips, error metrics and
the ONE way a figure is updated.

Sources: plotly.py ``basewidget.py`` (``_widget_data`` / ``_widget_layout`` are synced to the
browser only on full assignment; edits made after display travel as restyle/relayout messages and are
lost when the page reloads or the saved widget state is rendered: plotly.py issues 4998 and 4823).
:func:`resync` therefore ends every update by re-assigning the full data and layout, exactly as
``BaseFigureWidget._repr_mimebundle_`` does, so the model state always holds the current figure.
All quantization goes through :mod:`q4lab.reference` (the specification); nothing is re-implemented.
"""
from __future__ import annotations

from contextlib import contextmanager
from copy import deepcopy

import numpy as np

from .. import reference as ref

F32 = np.float32
QUANT_TYPES = ("nf4", "fp4", "int4")


def new_figure(**layout):
    """A plotly FigureWidget with q4lab's default look (imported lazily: plotly is slow to load)."""
    import plotly.graph_objects as go

    base = dict(template="plotly_white", height=380, margin=dict(l=60, r=20, t=50, b=50))
    base.update(layout)
    return go.FigureWidget(layout=base)


def resync(fig) -> None:
    """Copy the figure's full data and layout into the synced widget state (see module docstring)."""
    fig._widget_layout = deepcopy(fig._layout_obj._props)
    fig._widget_data = deepcopy(fig._data)


@contextmanager
def updating(fig):
    """``with updating(fig): ...`` batches edits into one message, then re-syncs the full state."""
    with fig.batch_update():
        yield fig
    resync(fig)


def redraw(fig, traces, title: str, **layout) -> None:
    """Replace all of ``fig``'s traces, set its title (and any other layout properties given), in
    one batched update that ends with :func:`resync`: the one way widgets change a figure."""
    with updating(fig):
        fig.data = []
        fig.add_traces(list(traces))
        for key, value in layout.items():
            fig.layout[key] = value
        fig.layout.title.text = title


def to_numpy_f32(w, name: str = "weight") -> np.ndarray:
    """A float32 NumPy copy of a tensor or array (fp16/bf16 are widened exactly)."""
    if hasattr(w, "detach"):
        w = w.detach().to("cpu").float().numpy()
    a = np.asarray(w)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected floating-point weights, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name}: empty weight (shape {a.shape})")
    return a.astype(F32)


def linear_weights(source) -> dict:
    """{name: float32 ndarray} from a tensor/array, a dict of them, or an ``nn.Module`` (the weight
    of every ``nn.Linear``; already-quantized ``q4lab.Linear4bit`` layers are dequantized)."""
    if isinstance(source, dict):
        if not source:
            raise ValueError("empty dict of weights: nothing to show")
        return {str(k): to_numpy_f32(v, str(k)) for k, v in source.items()}
    if hasattr(source, "named_modules"):
        return _module_weights(source)
    if hasattr(source, "shape"):
        return {"weight": to_numpy_f32(source)}
    raise TypeError(f"expected a tensor, an ndarray, a dict of them or an nn.Module, "
                    f"got {type(source).__name__}")


def _module_weights(model) -> dict:
    from torch import nn

    from ..nn import Linear4bit

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = to_numpy_f32(m.weight, name)
        elif isinstance(m, Linear4bit):
            out[name] = to_numpy_f32(m.dequantized_weight(), name)
    if not out:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Linear4bit layers")
    return out


def roundtrip(x: np.ndarray, quant_type: str, blocksize: int, double_quant: bool):
    """Quantize and dequantize with the reference: returns (x_hat float32, packed, state)."""
    packed, state = ref.quantize_4bit(x, blocksize, quant_type, double_quant)
    return ref.dequantize_4bit(packed, state, "float32"), packed, state


def error_stats(x: np.ndarray, x_hat: np.ndarray) -> dict:
    """MSE, max |error| and SQNR in dB = 10 log10(sum x^2 / sum (x - x_hat)^2), in float64."""
    x64, e64 = np.asarray(x, np.float64), np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)
    signal, noise = float(np.sum(x64 * x64)), float(np.sum(e64 * e64))
    sqnr = float("inf") if noise == 0 else float(10.0 * np.log10(signal / noise)) if signal else 0.0
    return {"mse": noise / x64.size, "max_abs_err": float(np.max(np.abs(e64))), "sqnr_db": sqnr}


def html_table(rows, header=None, caption: str = "") -> str:
    """A small HTML table (monospace cells) for readouts."""
    head = "".join(f"<th>{h}</th>" for h in header) if header else ""
    body = "".join("<tr>" + "".join(f"<td style='font-family:monospace;padding:0 8px'>{c}</td>"
                                     for c in row) + "</tr>" for row in rows)
    cap = f"<caption style='text-align:left'><b>{caption}</b></caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def f32_hex(v) -> str:
    """The 8 hex digits of a float32's bits, e.g. 3f800000 for 1.0."""
    return f"{int(np.asarray(v, dtype=F32).view(np.uint32)):08x}"


class WidgetBase:
    """Mixin: an object with a ``widget`` attribute displays as that widget in a notebook."""

    widget = None

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
