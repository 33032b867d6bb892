"""The 4-bit landscape on one real model: every format of ``q4lab.quant_types`` that has a
quantizer, side by side on a causal LM (SmolLM2 in the lab and notebook 12), as plain functions.

Each format is applied by weight round trip: every selected ``nn.Linear`` weight is replaced by
``dequantize_4bit(quantize_4bit(w))`` in float32 (the values a 4-bit kernel would compute with)
and put back on exit, so one float model serves every row. Measured per format, against the
float model on the same tokens, from one forward pass (``q4lab.quality.agreement``):
- perplexity on the actual next tokens;
- KL divergence KL(p_float || p_4bit) of the next-token distributions, mean over positions
  (log-softmax in float32, sums in float64);
- top-1 agreement: the fraction of positions whose most likely next token is unchanged;
- bits per parameter of the quantized layers from the stored bytes (``q4lab.storage_bytes``).

:func:`compare` gives the table's rows, :func:`kind_sensitivity` which layer kinds matter most,
:func:`table_html` / :func:`traces` / :func:`figure` the one table and the one bits-vs-perplexity
plot that notebook 12 and the quality lab (``q4lab.widgets.quality_lab``) both show.

Sources: QLoRA (arXiv 2305.14314) §3-§4 for NF4 / double quant; OCP MX v1.0 and NVIDIA NVFP4;
ggml's Q4_0 / Q4_1 (docs/formats.md); "equal bits" pairs NF4+DQ at block 64 (4.127 bits) with
NF4 at block 256 (4.125 bits).
"""
from __future__ import annotations

import html
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from . import quant_types
from .quality import agreement, log_probs
from .round_trip import FormatSpec
from .round_trip import round_tripped as _round_tripped


#: Pairs stored in (nearly) the same number of bits, for like-for-like comparisons.
EQUAL_BITS = ((FormatSpec("nf4", 64, True), FormatSpec("nf4", 256, False)),
              (FormatSpec("nf4", 64, False), FormatSpec("nvfp4")),
              (FormatSpec("nf4", 64, False), FormatSpec("q4_0")))


def registry_specs(registry=None) -> tuple:
    """Every format of ``q4lab.quant_types`` that has a quantizer (registry order) at its own
    blocksize, the bitsandbytes ones without double quant (QLoRA Table 2's setting), then each
    format of :data:`EQUAL_BITS` not yet listed (NF4+DQ/64, NF4/256)."""
    registry = quant_types.REGISTRY if registry is None else registry
    specs = [FormatSpec(q.name, None, False) for q in registry.values() if q.can_quantize]
    for pair in EQUAL_BITS:
        specs += [s for s in pair if s not in specs and s.quant_type in registry]
    return tuple(specs)


#: The rows of the landscape: :func:`registry_specs` of the registry as it is at import.
LANDSCAPE = registry_specs()


def linear_names(model: nn.Module, lm_head: bool = False) -> list[str]:
    """The names of the linear layers the landscape quantizes (all but lm_head by default)."""
    from .quality import linear_layers, select_layers

    return select_layers(linear_layers(model), "all", lm_head)


@contextmanager
def round_tripped(model: nn.Module, spec: FormatSpec, names: list[str] | None = None,
                  cache: dict | None = None):
    """``q4lab.round_trip.round_tripped`` over ``names``, by default every linear layer the
    landscape quantizes (:func:`linear_names`)."""
    with _round_tripped(model, spec, linear_names(model) if names is None else names,
                        cache) as info:
        yield info


def measure(model: nn.Module, input_ids: torch.Tensor, spec: FormatSpec,
            reference: torch.Tensor, names=None, cache: dict | None = None) -> dict:
    """One row: ``spec`` applied by round trip, then :func:`agreement` with ``reference`` (the
    float model's :func:`log_probs` on ``input_ids``), bits and bytes from the stored bytes."""
    ids = _as_batch(input_ids)
    with round_tripped(model, spec, names, cache) as info:
        measured = agreement(reference, log_probs(model, ids), ids)
    qt = quant_types.get(spec.quant_type)
    return {"label": spec.label, "quant_type": spec.quant_type, "blocksize": spec.blocksize,
            "double_quant": spec.double_quant, "bits_per_param": info["bits_per_param"],
            "stored_bytes": info["bytes"], **measured, "family": qt.family, "title": qt.title}


def _as_batch(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    return ids[None] if ids.dim() == 1 else ids


def float_row(model: nn.Module, input_ids, reference: torch.Tensor | None = None) -> dict:
    """The first row of every table: the source model measured against itself."""
    ids = _as_batch(input_ids)
    reference = log_probs(model, ids) if reference is None else reference
    return {"label": "float", "quant_type": None, "blocksize": None, "double_quant": None,
            "bits_per_param": None, **agreement(reference, reference, ids), "family": "float",
            "title": "the source model"}


def compare(model: nn.Module, input_ids: torch.Tensor, specs=LANDSCAPE, names=None,
            progress: bool = True, cache: dict | None = None) -> list[dict]:
    """One row per format (and a first row for the float model): label, quant_type, blocksize,
    double_quant, bits_per_param, stored_bytes, perplexity, kl, top1, family, title.
    ``cache``: see :func:`round_tripped`."""
    ids = _as_batch(input_ids)
    reference = log_probs(model, ids)
    rows = [float_row(model, ids, reference)]
    for spec in tqdm(list(specs), desc="formats", disable=not progress):
        rows.append(measure(model, ids, spec, reference, names, cache))
    return rows


def kind_sensitivity(model: nn.Module, input_ids, spec: FormatSpec = EQUAL_BITS[0][0],
                     reference: torch.Tensor | None = None, cache: dict | None = None,
                     progress: bool = True) -> list[dict]:
    """Which layers are most sensitive: for each layer kind (``self_attn.q_proj``,
    ``mlp.down_proj``, ...) every layer of that kind round-tripped in ``spec``, all else float;
    one :func:`agreement` row per kind plus "kind", "layers" and "params", most sensitive
    (largest KL) first. ``cache``: see :func:`round_tripped` (shared with :func:`compare`, no
    layer is quantized twice)."""
    from .quality import linear_layers

    ids = _as_batch(input_ids)
    reference = log_probs(model, ids) if reference is None else reference
    rows = [r for r in linear_layers(model) if r["depth"] is not None and r["group"] != "lm_head"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    out = []
    for kind in tqdm(kinds, desc=f"sensitivity per layer kind ({spec.label})",
                     disable=not progress):
        chosen = [r["name"] for r in rows if r["kind"] == kind]
        with round_tripped(model, spec, chosen, cache) as info:
            measured = agreement(reference, log_probs(model, ids), ids)
        out.append({"kind": kind, "layers": info["layers"], "params": info["params"],
                    **measured})
    return sorted(out, key=lambda r: -r["kl"])


def equal_bits_pairs(rows: list[dict], pairs=EQUAL_BITS) -> list[tuple[dict, dict]]:
    """The rows of each equal-bits pair that ``rows`` holds both of (matched by label)."""
    by = {r["label"]: r for r in rows}
    return [(by[a.label], by[b.label]) for a, b in pairs if a.label in by and b.label in by]


def table_html(rows: list[dict], caption: str = "") -> str:
    """The comparison as an HTML table (notebook 12 and the quality lab): format, family,
    bits/param, perplexity, KL, top-1 agreement, the equal-bits partner (:data:`EQUAL_BITS`)
    found in ``rows``, and model MB where every row has ``model_bytes`` (the lab's records)."""
    partners: dict = {}
    for a, b in equal_bits_pairs(rows):
        partners.setdefault(a["label"], []).append(b["label"])
        partners.setdefault(b["label"], []).append(a["label"])
    megabytes = all("model_bytes" in r for r in rows)
    head = "".join(f"<th>{h}</th>" for h in (
        "format", "family", "bits/param", "perplexity", "KL (nats)", "top-1 agreement",
        "same bits as", *(("model MB",) if megabytes else ())))
    body = ""
    for r in rows:
        cells = (r["label"], r["family"], _fmt(r["bits_per_param"], "{:.3f}"),
                 _fmt(r["perplexity"], "{:.3f}"), _fmt(r["kl"], "{:.4f}"),
                 _fmt(None if r["top1"] is None else 100 * r["top1"], "{:.1f} %"),
                 ", ".join(partners.get(r["label"], [])),
                 *((_fmt(r["model_bytes"] / 1e6, "{:.1f}"),) if megabytes else ()))
        body += "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


#: One colour per family in :func:`traces`.
FAMILY_COLORS = {"bnb": "#1f77b4", "mx": "#d62728", "gguf": "#2ca02c"}


def traces(rows: list[dict]) -> list:
    """The bits-vs-perplexity plot as plotly traces: one marker trace per family (label as
    text, KL and top-1 in the hover), a dotted segment joining each equal-bits pair, and the
    source model as a dashed line. ``rows`` as :func:`compare` returns them."""
    import plotly.graph_objects as go

    quantized = [r for r in rows if r["bits_per_param"] is not None]
    if not quantized:
        raise ValueError("no quantized row to plot (only the float model)")
    out = []
    for a, b in equal_bits_pairs(quantized):
        out.append(go.Scatter(x=[a["bits_per_param"], b["bits_per_param"]],
                              y=[a["perplexity"], b["perplexity"]], mode="lines",
                              line=dict(color="#999", dash="dot"), hoverinfo="skip",
                              name=f"equal bits: {a['label']} vs {b['label']}",
                              showlegend=False))
    where = _label_sides(quantized)
    for fam in dict.fromkeys(r["family"] for r in quantized):
        recs = [r for r in quantized if r["family"] == fam]
        out.append(go.Scatter(
            x=[r["bits_per_param"] for r in recs], y=[r["perplexity"] for r in recs],
            mode="markers+text", text=[r["label"] for r in recs], name=fam,
            textposition=[where[id(r)] for r in recs], cliponaxis=False,
            marker=dict(size=11, color=FAMILY_COLORS.get(fam, "#9467bd")),
            customdata=[[r["kl"], 100 * r["top1"]] for r in recs],
            hovertemplate="%{text}<br>%{x:.3f} bits/param<br>perplexity %{y:.3f}<br>"
                          "KL %{customdata[0]:.4f} nats<br>top-1 %{customdata[1]:.1f} %"
                          "<extra></extra>"))
    source = next((r for r in rows if r["bits_per_param"] is None), None)
    if source is not None:
        xs = [r["bits_per_param"] for r in quantized]
        out.append(go.Scatter(x=[min(xs) - 0.05, max(xs) + 0.05], y=[source["perplexity"]] * 2,
                              mode="lines", line=dict(color="black", dash="dash"),
                              name=f"source model ({source['perplexity']:.2f})",
                              hoverinfo="skip"))
    return out


def _label_sides(rows: list[dict]) -> dict:
    """Where each point's label goes: above a point alone at its bits, else (several formats at
    the same bits, e.g. 4.5) right and left in turn, in order of perplexity, so that the
    labels of neighbouring points never share a side."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(round(r["bits_per_param"], 2), []).append(r)
    where = {}
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["perplexity"])
        for i, r in enumerate(ranked):
            where[id(r)] = "top center" if len(ranked) == 1 else \
                ("middle right" if i % 2 == 0 else "middle left")
    return where


def figure(rows: list[dict], title: str = "every 4-bit format: perplexity vs bits/param"):
    """:func:`traces` in a plain plotly figure (the quality lab draws the same traces)."""
    import plotly.graph_objects as go

    return go.Figure(traces(rows), layout=dict(
        title=title, template="plotly_white", height=440,
        xaxis_title="bits/param of the 4-bit layers (stored bytes)",
        yaxis_title="perplexity (lower is better)"))
