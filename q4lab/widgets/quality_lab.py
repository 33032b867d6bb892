"""``quality_lab(model=None, tokenizer=None, text=None)``: change the 4-bit format of a real LLM and
watch its perplexity, bytes and output move; build QLoRA's data-type table one choice at a time,
then put every 4-bit format of the registry (``q4lab.quant_types``) side by side.

The codebook buttons are the registry's formats that have a quantizer (NF4, FP4, INT4, MXFP4,
NVFP4, Q4_0, Q4_1 today; a format added there appears here). Each change of a control
requantizes the ONE float model (``q4lab.quality.quantized``: NF4 / FP4 / INT4 as
``q4lab.Linear4bit`` through ``q4lab.quantize_model``, the others by float32 weight round trip),
measures perplexity, KL divergence and top-1 agreement with the float model's next-token
distribution, bits and bytes from the stored bytes and a short greedy continuation, restores the
float layers, and adds a labelled point to the "perplexity vs bits/param" scatter (history kept,
Pareto front drawn, the float model as a reference line). "run the paper's table" sweeps QLoRA
Table 2's data types; "every format" sweeps ``q4lab.landscape.LANDSCAPE`` (every registry format
plus the equal-bits pairs) into ``landscape.table_html``'s table and ``landscape.traces``' plot
(the same table and plot as notebook 12) and ranks the layer kinds by KL
(``landscape.kind_sensitivity``); "per-layer sensitivity" fills a heatmap of the perplexity
change per layer kind and depth.

Sources: QLoRA (arXiv 2305.14314) §3 and Table 2; the functions are :mod:`q4lab.quality` and
:mod:`q4lab.landscape`; widget
conventions (controls settable from Python, one re-synced redraw per change) are
``docs/architecture.md`` §4; bits/param from the stored bytes: ``docs/format.md`` §11.
Defaults: SmolLM2-135M-Instruct (``q4lab.models.load_smollm2``) and the first 1024 tokens of the
Apache License 2.0 text an installed dependency ships.
"""
from __future__ import annotations

import html

from .. import landscape
from .. import quality as Q
from .. import quant_types
from ._common import WidgetBase, hint, html_table, new_figure, redraw

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f")
LAYERS = (("attention", "attention"), ("MLP", "mlp"), ("all", "all"))
_BUTTON_NAMES = {"int4": "uniform INT4"}


def codebooks(registry=None) -> tuple:
    """(button label, quant_type) for every format of ``q4lab.quant_types`` with a quantizer,
    in registry order."""
    registry = quant_types.REGISTRY if registry is None else registry
    return tuple((_BUTTON_NAMES.get(q.name, q.name.upper()), q.name)
                 for q in registry.values() if q.can_quantize)


def trace_name(quant_type: str) -> str:
    """The scatter trace of a format: its name in capitals (``NF4``, ``MXFP4``, ``Q4_0``)."""
    return quant_type.upper()


_POSITIONS = ("top center", "bottom center", "middle right", "middle left", "top right",
              "bottom right", "top left", "bottom left")


def label_positions(points, labels, xrange, yrange, order=None, width: float = 780,
                    height: float = 300, char: float = 6.2, line: float = 14,
                    radius: float = 7, ringed: int | None = None) -> list:
    """Where to write each point's label so that labels overlap neither each other nor any
    marker: a plotly ``textposition`` per point, or None (no room: the label is only in the
    hover). Greedy, in ``order`` (most important first), over eight positions around the marker,
    in pixels of a ``width`` x ``height`` plot area spanning ``xrange`` x ``yrange``; a label is
    ``char`` pixels per character wide and ``line`` pixels high; point ``ringed`` wears the
    "current" ring (a larger marker)."""
    (x0, x1), (y0, y1) = xrange, yrange
    px = [((x - x0) / (x1 - x0) * width, (y1 - y) / (y1 - y0) * height) for x, y in points]
    taken = [(cx - radius, cy - radius, cx + radius, cy + radius) for cx, cy in px]
    out = [None] * len(points)
    ring = 1.6 * radius
    if ringed is not None:
        cx, cy = px[ringed]
        taken[ringed] = (cx - ring, cy - ring, cx + ring, cy + ring)
    for i in (range(len(points)) if order is None else order):
        (cx, cy), w, h = px[i], char * len(labels[i]), line
        r = ring if i == ringed else radius
        for pos in _POSITIONS:
            vert, horiz = pos.split()
            if vert == "middle":
                top = cy - h / 2
                left = cx + r + 2 if horiz == "right" else cx - r - 2 - w
            else:
                top = cy - r - 1 - h if vert == "top" else cy + r + 1
                left = {"center": cx - w / 2, "right": cx, "left": cx - w}[horiz]
            box = (left, top, left + w, top + h)
            if box[0] < -10 or box[2] > width + 10 or box[1] < -20:
                continue
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in taken):
                out[i] = pos
                taken.append(box)
                break
    return out


class QualityLab(WidgetBase):
    """Drive it from Python: ``quant_type`` / ``blocksize`` / ``double_quant`` / ``layers`` /
    ``lm_head`` / ``compute_dtype`` ``.value`` (each change evaluates once), or ``set(**changes)``
    for several at one evaluation; ``run_paper_table()``, ``sweep(configs)``,
    ``run_landscape()`` (every registry format, ``landscape_rows``, ``landscape_fig``,
    ``kind_sensitivity``), ``compute_sensitivity()``. ``quant_type`` offers every format of
    ``q4lab.quant_types`` with a quantizer; choosing one with a fixed block (MXFP4 32, NVFP4 16,
    Q4_0 / Q4_1 32) moves the blocksize there and turns double quant off. Read ``current`` (the
    shown record: perplexity, kl, top1, bits_per_param, model_bytes, continuation, ...),
    ``history`` (every configuration evaluated, in order), ``results`` (by config),
    ``float_record``, ``fig.data`` (the scatter) and ``sensitivity_fig.data`` (the heatmap)."""

    def __init__(self, model=None, tokenizer=None, text=None, tokens: int = 1024,
                 prompt: str = Q.PROMPT, new_tokens: int = 12, config: Q.LabConfig | None = None):
        import ipywidgets as W

        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (default: SmolLM2)")
        if model is None:
            from ..models import load_smollm2

            model, tokenizer = load_smollm2()
        model.eval()
        self.model, self.tokenizer, self.prompt, self.new_tokens = model, tokenizer, prompt, \
            new_tokens
        self.note = getattr(model, "q4lab_note", "")
        self.ids = Q.text_tokens(tokenizer, text, tokens)
        self.codebooks = codebooks()
        self.colors = {q: PALETTE[i % len(PALETTE)] for i, (_, q) in enumerate(self.codebooks)}
        self.params = Q.count_params(model)
        Q.linear_layers(model)  # a model that is already 4-bit is refused here
        cfg = Q.LabConfig() if config is None else config
        if not isinstance(cfg, Q.LabConfig):
            raise TypeError(f"config must be a q4lab.quality.LabConfig, got {type(cfg).__name__}")
        self.results: dict = {}      # LabConfig -> record
        self.history: list = []      # records in the order they were first evaluated
        self.sensitivity = None
        self.landscape_rows = None
        self.kind_sensitivity = None
        self._sens_cache: dict = {}
        self._round_trips: dict = {}
        self._hold = False

        self.quant_type = W.ToggleButtons(options=self.codebooks, value=cfg.quant_type,
                                          description="codebook")
        self.blocksize = W.SelectionSlider(options=quant_types.get(cfg.quant_type).blocksizes,
                                           value=cfg.blocksize, description="blocksize",
                                           continuous_update=False)
        self.double_quant = W.Checkbox(value=cfg.double_quant, description="double quant")
        self.layers = W.ToggleButtons(options=LAYERS, value=cfg.layers, description="layers")
        self.lm_head = W.Checkbox(value=cfg.lm_head, description="lm_head too")
        self.compute_dtype = W.Dropdown(options=Q.COMPUTE_DTYPES, value=cfg.compute_dtype,
                                        description="compute", layout=W.Layout(width="200px"))
        self.paper_button = W.Button(description="run the paper's table", icon="table",
                                     layout=W.Layout(width="200px"))
        self.sens_button = W.Button(description="per-layer sensitivity", icon="th",
                                    layout=W.Layout(width="200px"))
        self.landscape_button = W.Button(description="every format", icon="list",
                                         layout=W.Layout(width="200px"))
        self.readout = W.HTML()
        self.table = W.HTML()
        self.kinds_table = W.HTML()
        self.log = W.Output()
        self.sensitivity_box = W.VBox([])  # holds sensitivity_fig once there is something to show
        self.fig = new_figure(height=520, xaxis_title="bits/param, whole model (stored bytes)",
                              yaxis_title="perplexity (lower is better)",
                              margin=dict(l=70, r=20, t=60, b=60),
                              legend=dict(orientation="h", y=-0.18))
        self.sensitivity_fig = new_figure(height=360, xaxis_title="depth (transformer block)",
                                          margin=dict(l=150, r=20, t=60, b=50))
        self.landscape_fig = new_figure(height=460, margin=dict(l=70, r=20, t=60, b=60))
        self.landscape_box = W.VBox([])  # holds landscape_fig once "every format" has run
        for w in (self.quant_type, self.blocksize, self.double_quant, self.layers, self.lm_head,
                  self.compute_dtype):
            w.observe(self._changed, names="value")
        self.paper_button.on_click(lambda _b: self._in_log(self.run_paper_table))
        self.sens_button.on_click(lambda _b: self._in_log(self.compute_sensitivity))
        self.landscape_button.on_click(lambda _b: self._in_log(self.run_landscape))
        self.widget = W.VBox([
            self.quant_type, W.HBox([self.blocksize, self.double_quant]),
            W.HBox([self.layers, self.lm_head]),
            W.HBox([self.compute_dtype, self.paper_button, self.landscape_button,
                    self.sens_button]),
            self.readout, self.fig.view,
            hint("<b>Try this:</b> switch the codebook between NF4, FP4 and INT4 at blocksize 64, "
                 "then toggle double quant; then MXFP4, NVFP4, Q4_0 (their blocks are fixed). "
                 "<b>Look for:</b> NF4's point sits lowest of the 4.5-bit bnb codebooks; double "
                 "quant moves a point left (fewer bits) without moving it up; \"every format\" "
                 "compares them all, equal bits joined by a dotted line."),
            self.log, self.table, self.landscape_box, self.kinds_table, self.sensitivity_box])
        window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        # the float model's next-token log-probabilities: KL and top-1 of every record
        self.reference = Q.log_probs(model, self.ids) \
            if window is None or self.ids.numel() <= window else None
        self.float_record = Q.evaluate(model, self.ids, None, tokenizer, prompt, new_tokens,
                                       self.params, self.reference)
        self._apply(cfg)
        self.update()

    # ---- state ------------------------------------------------------------------------------
    @property
    def config(self) -> Q.LabConfig:
        """The configuration the controls show now."""
        return Q.LabConfig(self.quant_type.value, self.blocksize.value, self.double_quant.value,
                           self.layers.value, self.lm_head.value, self.compute_dtype.value)

    @property
    def perplexity(self) -> float:
        return self.current["perplexity"]

    def set(self, **changes) -> dict:
        """Set several controls (``quant_type=``, ``blocksize=``, ``double_quant=``, ``layers=``,
        ``lm_head=``, ``compute_dtype=``) and evaluate once; returns the new current record."""
        names = ("quant_type", "blocksize", "double_quant", "layers", "lm_head", "compute_dtype")
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown controls {unknown}; the controls are {list(names)}")
        new = self._next_config(self.config, changes)  # checks every value first
        self._apply(new)
        self.update()
        return self.current

    @staticmethod
    def _next_config(cfg: Q.LabConfig, changes: dict) -> Q.LabConfig:
        """``cfg`` with ``changes``; a new ``quant_type`` of another family brings its own
        blocksize, double quant and (round trip) float32 compute unless they are given too."""
        changes = dict(changes)
        new_qt = changes.get("quant_type", cfg.quant_type)
        if new_qt != cfg.quant_type:
            new_family = quant_types.family(new_qt)
            if new_family != "bnb" or cfg.family != "bnb":
                changes.setdefault("blocksize", None)
                changes.setdefault("double_quant", None)
            if new_family != "bnb":
                changes.setdefault("compute_dtype", "float32")
        return cfg.replace(**changes)

    def _apply(self, cfg: Q.LabConfig) -> None:
        """Move the controls to ``cfg`` (no evaluation): the blocksize slider offers the
        format's blocksizes; double quant and compute dtype are fixed where the format has no
        choice."""
        qt = quant_types.get(cfg.quant_type)
        self._hold = True
        try:
            self.quant_type.value = cfg.quant_type
            if tuple(self.blocksize.options) != tuple(qt.blocksizes):
                self.blocksize.options = qt.blocksizes
            self.blocksize.value = cfg.blocksize
            self.blocksize.disabled = len(qt.blocksizes) == 1
            self.double_quant.value = cfg.double_quant
            self.double_quant.disabled = qt.family != "bnb"
            self.compute_dtype.value = cfg.compute_dtype
            self.compute_dtype.disabled = qt.family != "bnb"
            self.layers.value, self.lm_head.value = cfg.layers, cfg.lm_head
        finally:
            self._hold = False
        self._shown = cfg

    def _changed(self, change) -> None:
        if self._hold:
            return
        if change["owner"] is self.quant_type:  # a new codebook brings its blocksizes
            try:
                cfg = self._next_config(self._shown, {"quant_type": change["new"]})
            except ValueError:
                self._apply(self._shown)
                raise
            self._apply(cfg)
        self.update()

    def _in_log(self, fn) -> None:
        self.log.clear_output()
        with self.log:
            fn()

    def evaluate(self, cfg: Q.LabConfig) -> dict:
        """The record of ``cfg`` (evaluated once, then cached), added to the history."""
        if cfg not in self.results:
            rec = Q.evaluate(self.model, self.ids, cfg, self.tokenizer, self.prompt,
                             self.new_tokens, self.params, self.reference)
            self.results[cfg] = rec
            self.history.append(rec)
        return self.results[cfg]

    def update(self) -> None:
        """Evaluate the controls' configuration (cached if seen before) and redraw."""
        cfg = self.config
        self._shown = cfg
        try:
            self.current = self.evaluate(cfg)
        except Exception as exc:
            self.readout.value = (f"<p style='color:#b00'><b>{html.escape(cfg.label)} failed:</b> "
                                  f"{html.escape(f'{type(exc).__name__}: {exc}')}</p>")
            raise
        self.redraw()

    def run_paper_table(self, progress: bool = True) -> list[dict]:
        """Evaluate QLoRA Table 2's data types (INT4, FP4, NF4, NF4 + double quant; blocksize 64,
        every linear layer but lm_head) with a progress bar; see :meth:`sweep`."""
        return self.sweep(Q.PAPER_TABLE, "QLoRA Table 2's data types on this model", progress)

    def sweep(self, configs, title: str = "sweep", progress: bool = True) -> list[dict]:
        """Evaluate each :class:`q4lab.quality.LabConfig` (cached ones are not recomputed) with a
        tqdm progress bar, add them to the scatter, show them as a table; returns their records.
        The controls and the current point stay where they are."""
        from tqdm.auto import tqdm

        configs = list(configs)
        bad = [c for c in configs if not isinstance(c, Q.LabConfig)]
        if bad or not configs:
            raise TypeError(f"sweep needs a non-empty list of q4lab.quality.LabConfig, got "
                            f"{bad[0] if bad else configs!r}")
        records = []
        for cfg in tqdm(configs, desc=title, unit="config", disable=not progress):
            records.append(self.evaluate(cfg))
            self.redraw()
        self.table.value = landscape.table_html([self.float_record, *records],
                                                f"{title}: {self.ids.numel()} tokens")
        return records

    def run_landscape(self, sensitivity: bool = True, progress: bool = True) -> list[dict]:
        """Every format of the registry side by side: :meth:`sweep` over
        ``q4lab.landscape.LANDSCAPE`` (each format with a quantizer at its own blocksize, plus
        the equal-bits pairs NF4+DQ/64 vs NF4/256 etc.), shown as ``landscape.table_html``'s
        table (perplexity, KL, top-1, equal-bits partner) and ``landscape.traces``' bits-vs-
        perplexity plot (``landscape_fig``); with ``sensitivity``, the layer kinds ranked by KL
        when every layer of one kind is quantized in the controls' format
        (``landscape.kind_sensitivity``, in ``kind_sensitivity`` and ``kinds_table``).
        Returns the records, registry order."""
        configs = [Q.LabConfig(s.quant_type, s.blocksize, s.double_quant)
                   for s in landscape.registry_specs()]
        records = self.sweep(configs, "every 4-bit format", progress)
        self.landscape_rows = [self.float_record, *records]
        redraw(self.landscape_fig, landscape.traces(self.landscape_rows),
               f"every 4-bit format on this model: perplexity vs bits/param "
               f"({self.ids.numel()} tokens; dotted: equal bits)",
               xaxis=dict(title=dict(text="bits/param of the 4-bit layers (stored bytes)")),
               yaxis=dict(title=dict(text="perplexity (lower is better)")))
        self.landscape_box.children = (self.landscape_fig.view,)
        if sensitivity:
            self.compute_kind_sensitivity(progress=progress)
        return records

    def compute_kind_sensitivity(self, progress: bool = True) -> list[dict]:
        """Which layer kinds matter most in the controls' format (its ``layers`` / ``lm_head``
        are ignored): ``landscape.kind_sensitivity`` (every layer of one kind round-tripped,
        all else float; KL, top-1, perplexity), most sensitive first, shown in
        ``kinds_table``. Round trips are cached in the lab: asking again costs forward passes
        only."""
        cfg = self.config
        spec = landscape.FormatSpec(cfg.quant_type, cfg.blocksize, cfg.double_quant)
        rows = landscape.kind_sensitivity(self.model, self.ids, spec, self.reference,
                                          self._round_trips, progress)
        self.kind_sensitivity = rows
        table = [(r["kind"], str(r["layers"]), f"{r['params']:,}", f"{r['kl']:.4f}",
                  f"{100 * r['top1']:.1f} %", f"{r['perplexity']:.3f}") for r in rows]
        self.kinds_table.value = html_table(
            table, ("layer kind", "layers", "params", "KL (nats)", "top-1", "perplexity"),
            f"one layer kind in {html.escape(spec.label)}, the rest float "
            f"({self.ids.numel()} tokens): most sensitive first")
        return rows

    def compute_sensitivity(self, kinds=None, depths=None, tokens: int | None = None,
                            progress: bool = True):
        """Perplexity change when each layer is quantized ALONE in the controls' format, on the
        first ``tokens`` tokens of the passage (default all), cached; drawn as a heatmap of layer
        kind x depth. Returns the :class:`q4lab.quality.Sensitivity`."""
        ids = self.ids
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
                raise ValueError(f"tokens must be an int >= 2, got {tokens!r}")
            ids = ids[:, :tokens]
        base = self.float_record["perplexity"] if ids.numel() == self.ids.numel() else None
        self.sensitivity = Q.sensitivity(self.model, ids, self.config, kinds, depths,
                                         self._sens_cache, base, progress)
        self.sensitivity_tokens = ids.numel()
        self._draw_sensitivity()
        self.sensitivity_box.children = (self.sensitivity_fig.view,)
        return self.sensitivity

    # ---- drawing ----------------------------------------------------------------------------
    def redraw(self) -> None:
        """Scatter (history per codebook, Pareto front, float reference, current point) and the
        readout, in one re-synced update."""
        import plotly.graph_objects as go

        hist, cur, f = self.history, self.current, self.float_record
        xs = [r["model_bits_per_param"] for r in hist]
        ys = [r["perplexity"] for r in hist]
        front = Q.pareto_front(list(zip(xs, ys)))
        pad = max(0.05, 0.08 * (max(xs) - min(xs)))
        xrange = [min(xs) - 2 * pad, max(xs) + 2 * pad]
        span = max(ys + [f["perplexity"]]) - min(ys + [f["perplexity"]]) or 1.0
        yrange = [min(ys + [f["perplexity"]]) - 0.12 * span, max(ys) + 0.15 * span]
        paper = {c.label for c in Q.PAPER_TABLE}
        first = [hist.index(cur)] + [i for i in front if hist[i] is not cur]
        first += [i for i, r in enumerate(hist) if r["label"] in paper and i not in first]
        order = first + [i for i in range(len(hist)) if i not in first]
        where = label_positions(list(zip(xs, ys)), [r["label"] for r in hist], xrange, yrange,
                                order, height=self.fig.layout.height - 170,
                                ringed=hist.index(cur))
        traces = []
        for _button, qt in self.codebooks:
            index = [i for i, r in enumerate(hist) if r["config"]["quant_type"] == qt]
            recs = [hist[i] for i in index]
            if not recs:
                continue
            traces.append(go.Scatter(
                x=[r["model_bits_per_param"] for r in recs], y=[r["perplexity"] for r in recs],
                text=[r["label"] if where[i] else "" for i, r in zip(index, recs)],
                textposition=[where[i] or "top center" for i in index],
                mode="markers+text", name=trace_name(qt), textfont=dict(size=11),
                cliponaxis=False,
                marker=dict(color=self.colors[qt], size=[18 if r is cur else 10 for r in recs],
                            opacity=1,
                            symbol=["diamond" if r["config"]["double_quant"] else "circle"
                                    for r in recs]),
                customdata=[[r["label"], r["bits_per_param"], r["model_bytes"] / 1e6]
                            for r in recs],
                hovertemplate="%{customdata[0]}<br>perplexity %{y:.3f}<br>%{x:.3f} bits/param "
                              "(model), %{customdata[1]:.3f} (4-bit layers)<br>"
                              "%{customdata[2]:.1f} MB<extra></extra>"))
        traces.append(go.Scatter(x=[xs[i] for i in front], y=[ys[i] for i in front],
                                 mode="lines", name="Pareto front", hoverinfo="skip",
                                 line=dict(color="#555", dash="dot", shape="hv")))
        traces.append(go.Scatter(x=xrange, y=[f["perplexity"]] * 2,
                                 mode="lines", name=f"{f['label']} ({f['perplexity']:.2f})",
                                 line=dict(color="black", dash="dash"), hoverinfo="skip"))
        traces.append(go.Scatter(x=[cur["model_bits_per_param"]], y=[cur["perplexity"]],
                                 mode="markers", name="current", hoverinfo="skip",
                                 marker=dict(size=18, color="rgba(0,0,0,0)",
                                             line=dict(color="#ff7f0e", width=3))))
        hidden = sum(p is None for p in where)
        redraw(self.fig, traces,
               f"perplexity vs bits/param: {len(hist)} configurations, {self.ids.numel()} tokens "
               f"(◇ = double quant{f'; {hidden} labels in the hover only' if hidden else ''})",
               yaxis=dict(range=yrange, title=dict(text="perplexity (lower is better)")),
               xaxis=dict(range=xrange,
                          title=dict(text="bits/param, whole model (8 × stored bytes / params)")))
        self.readout.value = self._readout()

    def _readout(self) -> str:
        c, f = self.current, self.float_record
        d = 100.0 * (c["perplexity"] / f["perplexity"] - 1)
        s = c["seconds"]
        rows = [("perplexity",
                 f"{c['perplexity']:.3f} ({d:+.2f} % vs {f['perplexity']:.3f} float)"),
                ("next token vs float", "-" if c["kl"] is None else
                 f"KL {c['kl']:.4f} nats, top-1 agreement {100 * c['top1']:.1f} %"),
                ("bits/param, 4-bit layers", f"{c['bits_per_param']:.4f} "
                 f"({c['layers']} layers, {c['quantized_params']:,} params, "
                 f"{c['stored_bytes']:,} bytes stored)"),
                ("model bytes", f"{c['model_bytes']:,} ({c['model_bits_per_param']:.3f} "
                 f"bits/param; float {f['model_bytes']:,})"),
                ("continuation", f"{html.escape(self.prompt)} → <b>"
                 f"{html.escape(c['continuation'])}</b>"),
                ("float model", f"{html.escape(self.prompt)} → {html.escape(f['continuation'])}"),
                ("seconds", f"quantize {s['quantize']:.2f}, perplexity {s['perplexity']:.2f}, "
                 f"continuation {s['continuation']:.2f}")]
        if not self.new_tokens:  # new_tokens=0: no continuation to show
            rows = [r for r in rows if r[0] not in ("continuation", "float model")]
        note = f"<p style='color:#555'>{html.escape(self.note)}</p>" if self.note else ""
        return html_table(rows, caption=html.escape(c["label"])) + note

    def _draw_sensitivity(self) -> None:
        import plotly.graph_objects as go

        s = self.sensitivity
        vals = [v for row in s.delta for v in row if v is not None]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 0.0)
        lim = max(abs(lo), abs(hi)) or 1.0
        heat = go.Heatmap(z=s.delta, x=[str(d) for d in s.depths], y=s.kinds, colorscale="RdBu_r",
                          zmid=0,
                          zmin=-lim, zmax=lim,
                          colorbar=dict(title=dict(text=f"Δ perplexity<br>{lo:+.3f} to "
                                                        f"{hi:+.3f}")),
                          hovertemplate="%{y} at depth %{x}: Δ perplexity %{z:+.4f}"
                                        "<extra></extra>")
        redraw(self.sensitivity_fig, [heat],
               f"one layer quantized alone ({s.label}, {self.sensitivity_tokens} tokens): "
               f"Δ perplexity {lo:+.3f} to {hi:+.3f} (float {s.base:.2f})",
               yaxis=dict(autorange="reversed", title=dict(text="layer kind")),
               xaxis=dict(type="category", title=dict(text="depth (transformer block)")))


def quality_lab(model=None, tokenizer=None, text=None, tokens: int = 1024,
                prompt: str = Q.PROMPT, new_tokens: int = 12,
                config: Q.LabConfig | None = None) -> QualityLab:
    """The quality lab on ``model`` / ``tokenizer`` (default SmolLM2-135M-Instruct) and ``text``
    (default the Apache License 2.0 passage, first ``tokens`` tokens). The model is borrowed: each
    evaluation quantizes it in place and puts its float layers back."""
    return QualityLab(model, tokenizer, text, tokens, prompt, new_tokens, config)
