"""Headless tests of q4lab.widgets: every widget driven from Python (set a control, read the
figure), its numbers checked against q4lab.reference byte for byte, on real MiniLM weights.

Style after bqplot's widget-state tests; the re-sync check follows docs/architecture.md §4 ("A
widget"): the figure's view (the Output widget whose state a page reload restores) must hold the
figure Python holds, or a reload shows stale data.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

import q4lab
from q4lab import reference as ref
from q4lab import widgets
from q4lab.constants import BLOCKSIZES
from q4lab.reference.codebooks import NF4_OFFSET
from q4lab.state import storage_bytes_for
from q4lab.testing import assert_bytes_equal
from q4lab.widgets._common import PLOTLY_MIME

plotly = pytest.importorskip("plotly")


def assert_synced(fig, in_widget: bool = True):
    """The widget state the browser restores on reload equals the figure Python holds: the view's
    one output is the figure's current plotly JSON. A widget's figure must already have its view
    (made when the widget was built, before any update); a figure a notebook displays on its own
    (``in_widget=False``) gets it on display."""
    out = fig.__dict__.get("_q4lab_view")
    if out is None and not in_widget:
        out = fig.view
    assert out is not None, "the figure has no view: it is not shown by any widget"
    (shown,) = out.outputs
    assert json.dumps(shown["data"][PLOTLY_MIME], sort_keys=True) == \
        json.dumps(fig.plotly_json(), sort_keys=True)


@pytest.fixture(scope="module")
def minilm():
    """{name: float32 ndarray} of MiniLM's 37 real linear weights."""
    models = pytest.importorskip("q4lab.models")
    return {k: v.numpy() for k, v in models.minilm_linear_weights().items()}


@pytest.fixture(scope="module")
def rng_weights():
    rng = np.random.default_rng(7)
    return {"odd": rng.standard_normal((37, 71)).astype(np.float32),  # odd n, tail block
            "heavy": rng.standard_t(2, size=(64, 100)).astype(np.float32)}


# ---- codebook explorer -------------------------------------------------------------------
def test_codebook_explorer_bnb_offset_gives_shipped_nf4_bytes():
    ex = widgets.codebook_explorer()
    assert_bytes_equal(ref.nf4_codebook(), ex.levels, "NF4 at offset 0.9677083")
    assert_bytes_equal(ref.nf4_codebook(), widgets.nf4_derivation(NF4_OFFSET)["levels"])
    nf4_trace = next(t for t in ex.fig.data if t.name == "NF4")
    assert_bytes_equal(ref.nf4_codebook().astype(np.float64), np.asarray(nf4_trace.x))
    assert "bit-identical" in ex.fig.layout.title.text
    assert_synced(ex.fig)


def test_codebook_explorer_slider_recomputes_levels_and_resyncs():
    ex = widgets.codebook_explorer()
    before = np.asarray(next(t for t in ex.fig.data if t.name == "NF4").x)
    ex.offset.value = 0.95
    after = np.asarray(next(t for t in ex.fig.data if t.name == "NF4").x)
    assert after.size == 16 and not np.array_equal(before, after)
    assert after[0] == -1.0 and after[7] == 0.0 and after[15] == 1.0
    assert "differs" in ex.fig.layout.title.text
    assert_synced(ex.fig)
    ex.show_fp4.value = False
    assert "FP4" not in [t.name for t in ex.fig.data]
    assert_synced(ex.fig)
    ex.reset.click()
    assert_bytes_equal(ref.nf4_codebook(), ex.levels)


@pytest.mark.parametrize("offset", [0.5, 1.0, 1.2, float("nan")])
def test_nf4_derivation_rejects_offsets_outside_the_open_interval(offset):
    with pytest.raises(ValueError, match="offset"):
        widgets.nf4_derivation(offset)


def test_nf4_gaps_hold_equal_mass_per_side_not_across_and_are_not_rounding_bins():
    from q4lab.reference.codebooks import midpoint_thresholds
    from q4lab.widgets.codebook_explorer import bin_shapes

    d = widgets.nf4_derivation(NF4_OFFSET)
    scale = float(d["scale"])
    masses = np.array([m for _, _, m in bin_shapes(d["levels"], scale)])
    # 7 gaps below 0 hold (offset-0.5)/7 = 0.0668 each, 8 above (offset-0.5)/8 = 0.0585 (float32
    # levels and normalization make them equal to ~1e-6 relative, not exactly)
    np.testing.assert_allclose(masses[:7], (NF4_OFFSET - 0.5) / 7, rtol=1e-5)
    np.testing.assert_allclose(masses[7:], (NF4_OFFSET - 0.5) / 8, rtol=1e-5)
    assert masses[:7].min() > 1.1 * masses[7:].max()
    # the rounding bins (midpoint to midpoint) do NOT hold equal mass
    from scipy.stats import norm
    edges = np.concatenate([[-np.inf], midpoint_thresholds(d["levels"]), [np.inf]]) * scale
    bins = np.diff(norm.cdf(edges))
    assert bins.max() > 1.2 * bins.min()
    ex = widgets.codebook_explorer()
    legend = [t.name for t in ex.fig.data if t.name]
    assert "normal mass between levels: 0.0585 above 0, 0.0668 below" in legend
    assert "rounding boundaries (midpoints)" in legend


def test_codebook_slider_moves_in_visible_steps_and_keeps_the_bnb_offset_on_its_grid():
    ex = widgets.codebook_explorer()
    s = ex.offset
    assert s.step >= 0.001                                   # not 1e-7: a key press must show
    k = round((NF4_OFFSET - s.min) / s.step)
    assert abs(s.min + k * s.step - NF4_OFFSET) < 1e-9      # the bnb offset is a grid point
    before = ex.levels.copy()
    s.value = round(s.value - s.step, 10)                    # one step to the left
    moved = np.abs(ex.levels - before).max()
    assert moved > 0.01, moved                               # one step moves a level visibly
    s.value = s.min + k * s.step                             # back on the grid point
    assert_bytes_equal(ref.nf4_codebook(), ex.levels)


# ---- block inspector ---------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize,double_quant", [(32, True), (64, False), (256, True)])
def test_block_inspector_bytes_are_the_reference_bytes(rng_weights, quant_type, blocksize,
                                                       double_quant):
    x = rng_weights["odd"]
    packed, state = ref.quantize_4bit(x, blocksize, quant_type, double_quant)
    x_hat = ref.dequantize_4bit(packed, state, "float32").reshape(-1)
    bi = widgets.block_inspector(x, blocksize, quant_type, double_quant)
    got_bytes, got_deq = [], []
    for b in range(bi.block.max + 1):
        bi.block.value = b
        got_bytes.append(bi.info["packed"])
        got_deq.append(bi.info["dequantized"])
        assert bi.info["absmax_used"] == ref.state_absmax(state)[b]
    assert_bytes_equal(packed, np.concatenate(got_bytes), "packed bytes shown")
    assert_bytes_equal(x_hat, np.concatenate(got_deq), "dequantized values shown")
    assert bi.block.max == -(-x.size // blocksize) - 1
    assert_synced(bi.fig)


def test_block_inspector_on_real_minilm_layer(minilm):
    name = "encoder.layer.2.intermediate.dense"
    bi = widgets.block_inspector(minilm)
    bi.layer.value = name
    bi.block.value = 123
    x = minilm[name].reshape(-1)
    packed, state = ref.quantize_4bit(minilm[name])
    assert_bytes_equal(packed[123 * 32:124 * 32], bi.info["packed"])
    assert bi.info["absmax"] == np.abs(x[123 * 64:124 * 64]).max()
    assert bi.info["absmax_code"] == state.absmax[123]
    html = bi.text.value
    assert " ".join(f"{b:02x}" for b in packed[123 * 32:124 * 32]) in html
    bi.blocksize.value = 4096
    assert bi.block.max == x.size // 4096 - 1 and bi.info["values"].size == 4096
    assert name in bi.fig.layout.title.text
    assert_synced(bi.fig)


def test_block_inspector_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        from q4lab.widgets.block_inspector import inspect_block

        inspect_block(np.ones(100, np.float32), 2, 64)
    with pytest.raises(TypeError, match="floating-point"):
        widgets.block_inspector(np.arange(10))
    with pytest.raises(ValueError, match="empty"):
        widgets.block_inspector({})
    with pytest.raises(ValueError, match="NaN"):
        widgets.block_inspector(np.array([1.0, np.nan], np.float32))


# ---- error histograms --------------------------------------------------------------------
def test_error_histograms_match_reference_round_trip(rng_weights):
    eh = widgets.error_histograms(rng_weights)
    eh.layer.value = "heavy"
    eh.blocksize.value = 128
    x = rng_weights["heavy"]
    for qt in ("nf4", "fp4", "int4"):
        packed, state = ref.quantize_4bit(x, 128, qt, True)
        err = ref.dequantize_4bit(packed, state, "float32").astype(np.float64) - x
        assert eh.stats[qt]["mse"] == np.mean(err * err)
    counts = {t.name: np.asarray(t.y) for t in eh.fig.data}
    assert set(counts) == {"NF4", "FP4", "INT4"}
    assert all(c.sum() == x.size for c in counts.values())
    assert "128" in eh.readout.value and f"{eh.stats['nf4']['sqnr_db']:.2f}" in eh.readout.value
    assert_synced(eh.fig)
    assert_synced(eh.sweep_fig)


def test_error_histograms_on_minilm_nf4_wins_and_error_grows_with_blocksize(minilm):
    """Measured on all-MiniLM-L6-v2: NF4 has the lowest MSE of the three formats at blocksize 64
    on every one of its 37 linear layers, and NF4's MSE grows strictly with the blocksize."""
    eh = widgets.error_histograms({k: minilm[k] for k in list(minilm)[:3]})
    eh.layer.value = list(minilm)[1]
    sweep = eh.compute_sweep()
    assert all(len(v) == len(BLOCKSIZES) for v in sweep.values())
    assert all(a < b for a, b in zip(sweep["nf4"], sweep["nf4"][1:]))
    assert [len(t.x) for t in eh.sweep_fig.data] == [len(BLOCKSIZES)] * 3
    nf4 = eh.sweep_fig.data[0]                                # SQNR vs stored bits, per blocksize
    assert list(nf4.text) == [str(b) for b in BLOCKSIZES] and round(nf4.x[1], 3) == 4.127
    assert all(a > b for a, b in zip(nf4.x, nf4.x[1:]))
    assert all(a > b for a, b in zip(nf4.y, nf4.y[1:]))
    assert_synced(eh.sweep_fig)
    from q4lab.widgets.error_histograms import layer_errors

    for name, w in minilm.items():
        mse = {qt: layer_errors(w, qt, 64)[1]["mse"] for qt in ("nf4", "fp4", "int4")}
        assert mse["nf4"] < min(mse["fp4"], mse["int4"]), (name, mse)


def test_error_histograms_accept_a_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    eh = widgets.error_histograms(model)
    assert list(eh.layer.options) == ["0", "2"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        widgets.error_histograms(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="expected a tensor"):
        widgets.error_histograms("weights.bin")


# ---- memory calculator -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4096, 4096), (384, 1536), (7, 131), (1, 1)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_linear_bytes_are_storage_bytes_of_real_quantized_tensors(shape, blocksize, double_quant):
    """The calculator counts each linear layer with state.storage_bytes_for; that equals the bytes
    of a real quantized tensor of that shape."""
    w = torch.randn(shape)
    _, state = q4lab.quantize_4bit(w, blocksize, "nf4", double_quant, backend="reference")
    assert storage_bytes_for(w.numel(), blocksize, double_quant) == q4lab.storage_bytes(state)


def test_memory_calculator_architecture_is_the_real_smollm2():
    """The SmolLM2 preset has the real model's shapes and parameter count, and the calculator's
    4-bit linear bytes equal what quantizing those layers really stores."""
    models = pytest.importorskip("q4lab.models")
    if models.available()["smollm2"] is not True:
        pytest.skip(models.available()["smollm2"])
    from q4lab.widgets.memory_calculator import ARCHITECTURES, linear_bytes

    model, _ = models.load_smollm2()
    arch = ARCHITECTURES["SmolLM2-135M"]
    assert sum(arch.counts().values()) == sum(p.numel() for p in model.parameters())
    real = {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head"}
    kinds = arch.linear_shapes()
    assert all(real[n] == kinds[n.rsplit(".", 1)[-1]] for n in real) and len(real) == 30 * 7
    for dq in (True, False):
        want = {}
        for shape in real.values():
            for k, v in storage_bytes_for(shape[0] * shape[1], 64, dq).items():
                want[k] = want.get(k, 0) + v
        got = {k: v for k, v in linear_bytes(arch, 64, dq).items() if v}
        assert got == want


def test_memory_calculator_counts_the_whole_model():
    r = widgets.model_memory("LLaMA-7B", 64, True, context=4096, batch=2, runtime_gb=1.5)
    c = r["params"]
    assert 6.7e9 < sum(c.values()) < 6.8e9                       # LLaMA-7B: 6.74 B parameters
    assert r["q4"]["embed"] == r["q4"]["lm_head"] == 2 * 32000 * 4096   # 16-bit, untied
    # K and V, layers, hidden, tokens, batch, 2 B
    assert r["q4"]["kv"] == 2 * 32 * 4096 * 4096 * 2 * 2
    assert r["q4"]["runtime"] == 1.5e9
    assert r["q4_gb"] * 1e9 == sum(r["q4"].values()) and r["fp16"]["linear"] == 2 * c["linear"]
    tied = widgets.model_memory("SmolLM2-135M")
    assert tied["q4"]["lm_head"] == 0 and tied["params"]["lm_head"] == 0
    gqa = widgets.model_memory("Llama-2-70B")["q4"]["kv"]
    assert gqa == widgets.model_memory("LLaMA-65B")["q4"]["kv"] // 8   # 8 KV heads instead of 64
    with pytest.raises(ValueError, match="context"):
        widgets.model_memory("LLaMA-7B", context=-1)
    with pytest.raises(ValueError, match="blocksize"):
        storage_bytes_for(100, 48)


def test_memory_calculator_bits_bar_shows_4_5_beside_4_127_with_every_part():
    mc = widgets.memory_calculator()
    assert mc.bits["plain"] == 4.5 and round(mc.bits["dq"], 3) == 4.127
    bars = {t.name: t for t in mc.fig.data}
    assert list(bars) == ["4-bit codes", "absmax", "nested absmax", "offset"]
    rows = ["NF4: 4.500 bits", "NF4 + double quant: 4.127 bits"]   # side by side, totals named
    assert all(list(t.y) == rows for t in bars.values())
    assert list(bars["absmax"].x) == [0.5, 0.125] and bars["nested absmax"].x[0] == 0
    assert all(t.textangle == 0 for t in bars.values())              # readable, not rotated
    notes = " ".join(a.text for a in mc.fig.layout.annotations)
    assert "nested absmax 0.00195" in notes and "offset" in notes and "saving 0.373" in notes
    assert mc.fig.layout.margin.l >= 200                             # the row labels fit
    mc.blocksize.value = 32
    assert mc.bits["plain"] == 5.0 and "blocksize 32" in mc.fig.layout.title.text
    assert_synced(mc.fig)
    from q4lab.widgets.memory_calculator import bits_figure
    assert [t.name for t in bits_figure(64).data] == list(bars)


def test_memory_calculator_65b_fits_48gb_but_not_24gb():
    mc = widgets.memory_calculator()
    assert mc.model.value == "LLaMA-65B" and mc.result["fits"] and 40 < mc.result["q4_gb"] < 48
    assert "fits a 48 GB" in mc.gb_fig.layout.title.text
    mc.gpu.value = 24
    assert not mc.result["fits"] and "does NOT fit" in mc.gb_fig.layout.title.text
    mc.gpu.value = 48
    mc.context.value = 32768                                     # the KV cache no longer fits
    assert not mc.result["fits"] and mc.result["q4"]["kv"] > 40e9
    mc.double_quant.value = False
    assert mc.result["bits_per_param"] == pytest.approx(4.5, abs=1e-9)
    names = [t.name for t in mc.gb_fig.data]
    assert names[0].startswith("linear layers") and "KV cache (16-bit)" in names
    assert_synced(mc.fig)
    assert_synced(mc.gb_fig)
    mc.context.value = -3
    assert "context" in mc.readout.value


# ---- model dashboard ---------------------------------------------------------------------
def test_model_dashboard_plain_and_quantized_agree(rng_weights):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 33))
    plain = widgets.model_dashboard(model)
    assert [r["name"] for r in plain.rows] == ["0", "2"]
    for r, lin in zip(plain.rows, (model[0], model[2])):
        packed, state = ref.quantize_4bit(lin.weight.detach().numpy())
        assert r["bytes"] == sum(q4lab.storage_bytes(state).values())
    original = {"0": model[0].weight.detach().clone(), "2": model[2].weight.detach().clone()}
    quantized = nn.Sequential(q4lab.Linear4bit.from_linear(model[0]), nn.GELU(),
                              q4lab.Linear4bit.from_linear(model[2]))
    qd = widgets.model_dashboard(quantized, original=original)
    assert qd.is_quantized and qd.quant_type.disabled
    for a, b in zip(plain.rows, qd.rows):
        assert (a["bytes"], a["mse"], a["sqnr_db"]) == (b["bytes"], b["mse"], b["sqnr_db"])
    no_ref = widgets.model_dashboard(quantized)
    assert no_ref.rows[0]["mse"] is None and "original=" in no_ref.table.value
    assert_synced(qd.fig)


def test_model_dashboard_heatmap_on_minilm(minilm):
    md = widgets.model_dashboard(minilm)
    heat = md.fig.data[0]
    assert list(heat.y) == ["other"] + [f"block {i}" for i in range(6)]
    # the shared prefix is said once, in the axis title; labels are short and horizontal
    assert len(heat.x) == 7 and "intermediate.dense" in heat.x and "pooler.dense" in heat.x
    assert not any(x.startswith("encoder.layer.*.") for x in heat.x)
    assert "encoder.layer.*." in md.fig.layout.xaxis.title.text
    assert md.fig.layout.xaxis.tickangle == 0
    # the colour scale says how small the spread is
    sq = [r["sqnr_db"] for r in md.rows]
    spread = f"{max(sq) - min(sq):.2f} dB"
    assert f"spread {spread}" in md.fig.layout.title.text and spread in heat.colorbar.title.text
    assert len(md.rows) == 37
    md.metric.value = "bytes"
    assert "bytes" in md.fig.layout.title.text
    assert sum(v for row in md.fig.data[0].z for v in row if v is not None) == \
        sum(r["bytes"] for r in md.rows)
    md.blocksize.value = 256
    assert all(r["bits_per_param"] < 4.05 for r in md.rows)
    assert_synced(md.fig)


def test_widgets_display_as_their_box():
    mc = widgets.memory_calculator()
    bundle = mc._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == mc.widget.model_id


# ---- compute dtype -----------------------------------------------------------------------
def test_compute_dtype_explorer_on_minilm(minilm):
    """fp32 compute adds exactly nothing; on real MiniLM layers bf16 compute (8-bit mantissa)
    adds more error than fp16 (11-bit), and both far less than the 4-bit weight itself."""
    name = "encoder.layer.0.attention.self.query"
    cd = widgets.compute_dtype_explorer({name: minilm[name]}, dtype="float32")
    assert not np.any(cd.errors["compute"])
    rms = {}
    for dt in ("float16", "bfloat16"):
        cd.dtype.value = dt
        rms[dt] = np.sqrt(np.mean(cd.errors["compute"] ** 2))
        assert dt in cd.fig.layout.title.text
        assert_synced(cd.fig)
    quant = np.sqrt(np.mean(cd.errors["quant"] ** 2))
    assert 0 < rms["float16"] < rms["bfloat16"] < quant / 10
    # the log count axis is labelled 1, 10, 100, ... (no "5, 2, 1000, 5, 2" minor labels)
    ax = cd.fig.layout.yaxis
    assert ax.type == "log" and list(ax.ticktext) == [f"{v:g}" for v in ax.tickvals]
    assert all(np.log10(v) == round(np.log10(v)) for v in ax.tickvals)
    with pytest.raises(ValueError, match="compute dtype"):
        from q4lab.widgets.compute_dtype import output_errors

        output_errors(minilm[name], "float64")


def test_dtype_table_and_timings_are_validated_measurements():
    from q4lab.widgets.compute_dtype import dtype_table, speed_figure, time_matmuls

    t = {r["dtype"]: r for r in dtype_table()}
    assert t["float16"]["max"] == 65504 and t["bfloat16"]["max"] > 3.3e38
    assert t["bfloat16"]["smallest_normal"] == t["float32"]["smallest_normal"]
    assert [t[d]["eps"] for d in ("float32", "float16", "bfloat16")] == [2.0 ** -23, 2.0 ** -10,
                                                                         2.0 ** -7]
    times = time_matmuls(64, 128, 64, min_run_time=0.01)
    assert set(times) == {"float32", "float16", "bfloat16"}
    assert times["float32"]["rel_err"] < times["float16"]["rel_err"] < times["bfloat16"]["rel_err"]
    fig = speed_figure(times, "t")
    assert list(fig.data[0].x) == list(times)
    shown = fig.view.outputs[0]["data"][PLOTLY_MIME]     # what the notebook displays
    assert shown["data"][0]["x"] == list(times)


# ---- log axes ----------------------------------------------------------------------------
@pytest.mark.parametrize("lo,hi", [(0.04, 3.2), (1, 3000), (0.3, 0.9), (2, 2), (1e-3, 1e3),
                                   (18.8, 20.6), (0.0019, 0.31)])
def test_log_ticks_are_readable(lo, hi):
    ax = widgets.log_ticks(lo, hi)
    vals, text = ax["tickvals"], ax["ticktext"]
    assert ax["type"] == "log" and vals == sorted(vals) and (len(vals) >= 3 or lo == hi)
    assert all(lo / 1.001 <= v <= hi * 1.001 for v in vals) or len(vals) == 1
    for v, label in zip(vals, text):        # every label is the whole value, never a bare digit
        assert float(label.replace("k", "e3").replace("M", "e6")) == pytest.approx(v)
    with pytest.raises(ValueError, match="log axis"):
        widgets.log_ticks(0, 1)


# ---- hints -------------------------------------------------------------------------------
def test_every_widget_says_what_to_try_and_what_to_look_for(rng_weights):
    import ipywidgets as W

    built = [widgets.codebook_explorer(), widgets.block_inspector(rng_weights["odd"]),
             widgets.error_histograms(rng_weights), widgets.memory_calculator(),
             widgets.model_dashboard(rng_weights), widgets.compute_dtype_explorer(rng_weights),
             widgets.normal_premise(rng_weights)]
    for w in built:
        box = w.widget.children
        figs = [i for i, c in enumerate(box) if isinstance(c, W.Output)
                and PLOTLY_MIME in c.outputs[0]["data"]]
        hints = [i for i, c in enumerate(box) if isinstance(c, W.HTML)
                 and "Try this" in c.value and "Look for" in c.value]
        # one line, under the figures
        assert len(hints) == 1 and hints[0] > max(figs), type(w).__name__


# ---- normal premise and code usage ---------------------------------------------------------
def test_code_usage_counts_the_reference_codes_and_is_not_uniform_on_normal_data():
    x = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)
    use = widgets.code_usage(x, 64)
    packed, _ = ref.quantize_4bit(x, 64, "nf4", False)
    from q4lab.reference.blockwise import unpack_nibbles
    assert np.array_equal(use * x.size, np.bincount(unpack_nibbles(packed, x.size), minlength=16))
    assert 0.015 < use.min() < 0.02 and 0.09 < use.max() < 0.095
    assert 3.87 < widgets.entropy_bits(use) < 3.90 and widgets.entropy_bits(np.ones(16)) == 4.0
    from q4lab.widgets.normal_premise import absmax_over_sigma, design_scale, scaled_by_block
    assert 2.4 < absmax_over_sigma(x, 64) < 2.7 and abs(design_scale() - 1.8481308) < 1e-6
    xn = scaled_by_block(x[:640], 64)
    # each block's own maximum lands at ±1 (x * RN(1/absmax): within one float32 ulp of 1)
    assert np.sum(np.abs(xn) >= np.float32(1) - np.float32(2 ** -23)) == 10
    assert np.abs(xn).max() <= 1


def test_normal_premise_widget_on_minilm(minilm):
    name = "encoder.layer.0.output.dense"
    npw = widgets.normal_premise({name: minilm[name]})
    assert_bytes_equal(npw.usage["data"], widgets.code_usage(minilm[name], 64))
    assert "median absmax" in npw.fig.layout.title.text
    assert [t.name for t in npw.usage_fig.data] == [name, "N(0, 1) data"]
    npw.blocksize.value = 4096
    assert npw.ratio["normal"] > 3.5 and "blocksize 4096" in npw.fig.layout.title.text
    npw.layer.value = npw.layer.options[-1]                   # the N(0, 1) sample itself
    assert "N(0, 1)" in npw.layer.value
    # two normal samples agree
    assert np.abs(npw.usage["data"] - npw.usage["normal"]).max() < 0.003
    assert_synced(npw.fig)
    assert_synced(npw.usage_fig)


# ---- blockwise trade-off ---------------------------------------------------------------------
def test_one_scale_per_tensor_is_the_reference_with_one_block():
    from q4lab.widgets.blockwise_tradeoff import per_tensor_roundtrip

    x = np.random.default_rng(3).standard_normal(4096).astype(np.float32)
    packed, state = ref.quantize_4bit(x, 4096, "nf4", False)
    assert_bytes_equal(ref.dequantize_4bit(packed, state), per_tensor_roundtrip(x))


def test_outliers_and_tradeoff_on_minilm(minilm):
    bt = widgets.blockwise_tradeoff
    few = {k: minilm[k] for k in list(minilm)[:6]}
    rows = bt.outlier_rows(few)
    assert all(r["blockwise_db"] > r["per_tensor_db"] for r in rows)
    worst = min(rows, key=lambda r: r["per_tensor_db"])
    assert worst["name"] == "encoder.layer.0.output.dense" and worst["per_tensor_db"] < 1.0
    fig = bt.outlier_figure(rows)
    assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.ticktext)
    assert_synced(fig, in_widget=False)
    trade = bt.tradeoff_rows({k: few[k] for k in list(few)[:2]}, blocksizes=(32, 64, 4096))
    summary = bt.tradeoff_summary(trade)
    assert summary[False][64]["bits"] == 4.5 and round(summary[True][64]["bits"], 3) == 4.127
    assert summary[True][32]["median"] > summary[True][64]["median"] > summary[True][4096]["median"]
    tf = bt.tradeoff_figure(trade)
    assert [t.name for t in tf.data] == ["NF4 (float32 absmax)", "NF4 + double quant"]
    assert tf.layout.xaxis.type == "log" and tf.data[0].x[1] == 0.5     # side information, log x
    assert list(tf.data[1].text) == ["32", "64", "4096"]
    assert_synced(tf, in_widget=False)
