"""Shared glue for the q4lab widgets: weight collection, reference round trips, error metrics and
the ONE way a figure is updated.

A figure is a :class:`LiveFigure`: a plain plotly ``Figure`` shown through an ``ipywidgets.Output``
that holds only the figure's JSON (rendered by the ``jupyterlab-plotly`` extension), not a
``FigureWidget``, whose 5 MB JavaScript bundle in every widget state made page reloads fail
(docs/architecture.md §5). :func:`redraw` / :func:`updating` end every update with :func:`resync`,
which rewrites the view from the full figure, so the widget state always holds the current figure
(the state-loss class of plotly.py issues 4998 and 4823 cannot occur).
All quantization goes through :mod:`q4lab.reference` (the specification) and every error through
:func:`q4lab.metrics.error_stats` (one SQNR rule); nothing is re-implemented.
"""
from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import plotly.graph_objects as go

from .. import reference as ref
from ..constants import QUANT_TYPES  # noqa: F401  (re-exported to the widgets)

F32 = np.float32
PLOTLY_MIME = "application/vnd.plotly.v1+json"   # rendered by the jupyterlab-plotly extension


def new_figure(**layout) -> LiveFigure:
    """A :class:`LiveFigure` with q4lab's default look."""
    base = dict(template="plotly_white", height=380, margin=dict(l=60, r=20, t=80, b=50),
                title=dict(font=dict(size=15)),
                legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, xanchor="left",
                            traceorder="normal"))
    base.update(layout)
    return LiveFigure(layout=base)


class LiveFigure(go.Figure):
    """A plain plotly ``Figure`` that knows the widget showing it: ``fig.view``, an
    ``ipywidgets.Output`` whose one output is the figure's plotly JSON (rendered in JupyterLab by
    the ``jupyterlab-plotly`` extension that plotly installs). :func:`resync` rewrites that output
    from the current data and layout, so the widget state always holds the figure that a page
    reload shows. Displaying ``fig`` in a notebook displays its view; put ``fig.view`` in a
    ``VBox``. Change a shown figure through :func:`redraw` or ``with updating(fig):`` (or call
    :func:`resync` after editing it directly).

    Why not ``go.FigureWidget``: its widget state carries plotly's 5 MB JavaScript bundle, so a page
    reload of a notebook with a few figures fetches a 20 MB reply whose parsing outlasts
    ipywidgets' and anywidget's 2 s deadlines ("model not found", figures that stop following their
    sliders; docs/architecture.md §5). This figure's state is its JSON only.
    """

    @property
    def view(self):
        out = self.__dict__.get("_q4lab_view")
        if out is None:
            import ipywidgets as W

            out = self._q4lab_view = W.Output()
            resync(self)
        return out

    def plotly_json(self) -> dict:
        """The figure as the JSON-safe dict its view shows (arrays as plotly's JSON encodes
        them)."""
        return json.loads(self.to_json())

    def _ipython_display_(self):
        from IPython.display import display

        display(self.view)


def resync(fig) -> None:
    """Rewrite the figure's view (if it has one yet) from its current data and layout: the one
    place a widget's state follows its figure (see :class:`LiveFigure`)."""
    out = fig.__dict__.get("_q4lab_view")
    if out is None:
        return
    title = fig.layout.title.text or "figure"
    out.outputs = ({"output_type": "display_data", "metadata": {},
                    "data": {PLOTLY_MIME: fig.plotly_json(),
                             "text/plain": f"<q4lab figure: {title}>"}},)


@contextmanager
def updating(fig):
    """``with updating(fig): ...`` batches edits, then re-syncs the view once."""
    with fig.batch_update():
        yield fig
    resync(fig)


def redraw(fig, traces, title: str, **layout) -> None:
    """Replace all of ``fig``'s traces, set its title and merge any other layout properties given
    (``fig.update_layout``: ``yaxis=log_ticks(...)`` keeps the axis title), in one batched update
    that ends with :func:`resync`: the one way widgets and notebooks change a figure."""
    with updating(fig):
        fig.data = []
        fig.add_traces(list(traces))
        if layout:
            fig.update_layout(**layout)
        fig.layout.title.text = title


def hint(text: str):
    """The one-line "Try this / Look for" caption every widget shows under its figure."""
    import ipywidgets as W

    return W.HTML(f"<p style='margin:2px 0 8px 0;color:#333'>{text}</p>")


def log_ticks(lo: float, hi: float) -> dict:
    """Axis properties for a log axis spanning [lo, hi] with readable labels: ticks at 1, 2 and 5
    times each power of ten, each written out in full ("0.05", "0.1", "20", "1k"), instead of
    plotly's default minor labels ("5, 2, 1000, 5, 2, 100", which read as nonsense). Spans over
    more than three decades get only the powers of ten; a span too narrow for three of those ticks
    gets 1, 1.5, 2, 3, ... 9 times each power, and failing that evenly spaced round values."""
    lo, hi = float(lo), float(hi)
    if not (lo > 0 and hi >= lo and np.isfinite(hi)):
        raise ValueError(f"a log axis needs 0 < lo <= hi < inf, got lo={lo}, hi={hi}")
    first, last = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    vals = []
    for mults in ((1,) if last - first > 3 else (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
        vals = [float(f"{m * 10.0 ** e:.12g}") for e in range(first, last + 1) for m in mults]
        vals = [v for v in vals if lo / 1.0001 <= v <= hi * 1.0001]
        if len(vals) >= 3:
            break
    if len(vals) < 3 and hi > lo:
        raw = (hi - lo) / 4
        mag = 10.0 ** np.floor(np.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        vals = [float(f"{v:.12g}") for v in np.arange(np.ceil(lo / step) * step, hi * 1.0001, step)]
    vals = vals or [lo]
    return dict(type="log", tickvals=vals, ticktext=[_tick_text(v) for v in vals],
                range=[float(np.log10(lo)) - 0.05, float(np.log10(hi)) + 0.05])


def _tick_text(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


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
