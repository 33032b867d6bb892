"""q4lab.report on small synthetic models: its byte totals are the bytes of the tensors really
stored, its error numbers agree whether kept at quantize time or computed from a reference, and it
displays as HTML and text. Models: tests/helpers.py.
"""
import pytest
import torch
from helpers import CFG32, linear_names, tiny

import q4lab
from q4lab import Linear4bit, Q4Config


# ---- report --------------------------------------------------------------------------------------
def stored_bytes(layer):
    s = layer.quant_state
    parts = [layer.packed, s.absmax] + ([s.state2.absmax, s.offset] if s.nested else [])
    return sum(t.numel() * t.element_size() for t in parts)


@pytest.mark.parametrize("dq", [True, False])
def test_report_bytes_are_the_stored_tensors(dq):
    model = tiny(tie=False).to(torch.bfloat16)
    q4lab.quantize_model(model, Q4Config(double_quant=dq, blocksize=32), progress=False)
    rep = q4lab.report(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert [r["layer"] for r in rep.rows] == list(layers)
    for r in rep.rows:
        layer = layers[r["layer"]]
        assert r["bytes_after"] == stored_bytes(layer)
        assert r["bytes_before"] == layer.quant_state.numel * 2  # bf16 original
        assert r["bits_per_param"] == 8 * stored_bytes(layer) / layer.quant_state.numel
        assert r["mse"] is None
    assert rep.total["bytes_after"] == sum(stored_bytes(m) for m in layers.values())
    assert rep.total["bytes_saved"] == rep.total["bytes_before"] - rep.total["bytes_after"] > 0
    assert rep.model_bytes["before"] - rep.model_bytes["now"] == rep.total["bytes_saved"]


def test_report_errors_from_kept_stats_and_from_reference_agree():
    model, ref = tiny(tie=False), tiny(tie=False)
    q4lab.quantize_model(model, Q4Config(**CFG32), progress=False, keep_error_stats=True)
    kept, given = q4lab.report(model), q4lab.report(model, reference=ref)
    by_state_dict = q4lab.report(model, reference=ref.state_dict())
    for a, b, c in zip(kept.rows, given.rows, by_state_dict.rows):
        assert a["mse"] == b["mse"] == c["mse"] > 0
        assert a["max_abs_err"] == b["max_abs_err"] and a["sqnr_db"] == b["sqnr_db"]
        w = ref.get_submodule(a["layer"]).weight.double()
        w = w.detach()
        w_hat = model.get_submodule(a["layer"]).dequantized_weight(torch.float32).double()
        assert a["mse"] == float(((w_hat - w) ** 2).sum()) / w.numel()
    with pytest.raises(ValueError, match="shape"):
        q4lab.report(model, reference={n: torch.zeros(3, 3) for n in linear_names(ref)})


def test_report_displays():
    model = tiny()
    q4lab.quantize_model(model, progress=False, keep_error_stats=True)
    rep = q4lab.report(model, note="synthetic weights")
    html, text = rep._repr_html_(), str(rep)
    assert html.count("<tr>") == len(rep.rows) + 2 and "blocks.1.down" in html
    assert "TOTAL" in text and "synthetic weights" in text and "bits/param" in text
    assert isinstance(rep.rows[0], dict) and rep.total["layers"] == len(rep.rows)


def test_report_with_reference_after_add_lora():
    model = torch.nn.Sequential()
    model.q_proj = torch.nn.Linear(128, 128)
    model.v_proj = torch.nn.Linear(128, 128)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    q4lab.quantize_model(model, progress=False)
    q4lab.add_lora(model, r=4, alpha=8, target_modules=("q_proj",))
    rep = q4lab.report(model, reference=original)
    assert {row["layer"] for row in rep.rows} >= {"q_proj.base", "v_proj"}
    assert all(row["mse"] is not None for row in rep.rows)
