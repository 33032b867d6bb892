"""Headless tests of q4lab.widgets: every widget driven from Python (set a control, read the
figure), its numbers checked against q4lab.reference byte for byte, on real MiniLM weights.

Style after bqplot's widget-state tests; the re-sync check follows DESIGN.md §7 (plotly.py issues
4998/4823: the synced ``_widget_data`` must hold the current figure, or a reload shows stale data).
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

import q4lab
from q4lab import reference as ref
from q4lab import widgets
from q4lab.reference.blockwise import BLOCKSIZES
from q4lab.reference.codebooks import NF4_OFFSET
from q4lab.testing import assert_bytes_equal

plotly = pytest.importorskip("plotly")


def assert_synced(fig):
    """The widget state the browser restores on reload equals the figure Python holds."""
    enc = plotly.utils.PlotlyJSONEncoder
    assert json.dumps(fig._widget_data, cls=enc) == json.dumps(fig._data, cls=enc)
    assert json.dumps(fig._widget_layout, cls=enc) == json.dumps(fig._layout_obj._props, cls=enc)


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


def test_nf4_bins_hold_equal_mass_per_side():
    from q4lab.widgets.codebook_explorer import bin_shapes

    d = widgets.nf4_derivation(NF4_OFFSET)
    masses = np.array([m for _, _, m in bin_shapes(d["levels"], float(d["scale"]))])
    # 7 bins below 0 hold (offset-0.5)/7 each, 8 above hold (offset-0.5)/8 (float32 levels and
    # normalization make them equal to ~1e-6 relative, not exactly: this is a statistical claim)
    np.testing.assert_allclose(masses[:7], (NF4_OFFSET - 0.5) / 7, rtol=1e-5)
    np.testing.assert_allclose(masses[7:], (NF4_OFFSET - 0.5) / 8, rtol=1e-5)


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
def test_tensor_bytes_equals_storage_bytes_of_a_real_quantized_tensor(shape, blocksize,
                                                                       double_quant):
    w = torch.randn(shape)
    _, state = q4lab.quantize_4bit(w, blocksize, "nf4", double_quant, backend="reference")
    assert widgets.tensor_bytes(w.numel(), blocksize, double_quant) == q4lab.storage_bytes(state)


def test_memory_calculator_bits_per_param_from_bytes():
    w = torch.randn(4096, 4096)
    for dq, bits in ((False, 4.5), (True, 4.127)):
        _, state = q4lab.quantize_4bit(w, 64, "nf4", dq, backend="reference")
        assert round(q4lab.bits_per_param(state), 3) == bits
        mc = widgets.memory_calculator("custom", 64, dq)
        mc.custom.value = 4096 * 4096 / 1e9
        assert mc.result["bits_per_param"] == q4lab.bits_per_param(state)
        assert round(mc.result["bits_per_param"], 3) == bits


def test_memory_calculator_65b_fits_48gb_but_not_24gb():
    mc = widgets.memory_calculator()
    assert mc.model.value == "65B" and mc.result["fits"] and 33 < mc.result["gb"] < 34
    assert "fit a 48 GB" in mc.gb_fig.layout.title.text
    mc.gpu.value = 24
    assert not mc.result["fits"] and "do NOT fit" in mc.gb_fig.layout.title.text
    mc.double_quant.value = False
    assert mc.result["bits_per_param"] == pytest.approx(4.5, abs=1e-9)
    assert [t.name for t in mc.fig.data] == ["4-bit codes", "absmax", "nested absmax", "offset"]
    assert_synced(mc.fig)
    assert_synced(mc.gb_fig)
    mc.model.value = "custom"
    mc.custom.value = -3
    assert "must be positive" in mc.readout.value
    with pytest.raises(ValueError, match="blocksize"):
        widgets.tensor_bytes(100, 48)


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
    assert len(heat.x) == 7 and "encoder.layer.*.intermediate.dense" in heat.x
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
    with pytest.raises(ValueError, match="compute dtype"):
        from q4lab.widgets.compute_dtype import output_errors

        output_errors(minilm[name], "float64")
