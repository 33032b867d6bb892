"""MXFP4, NVFP4, Q4_0, Q4_1 (quantize) and Q4_K, IQ4_NL (dequantize) against their own
implementations, byte for byte: torchao ``to_mx`` / ``nvfp4_quantize`` and the gguf package
(``bench/_format_parity.py`` holds the anchors and the adversarial cases; the full sweep of
>= 10^4 cases per format is ``bench/sweep_formats.py``). A slice of every named category runs
here, and each category is shown to reach the case it names."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _format_parity as fp  # noqa: E402

CASES_PER_CATEGORY = 4
FORMATS = fp.QUANTIZED + fp.DEQUANT_ONLY


@pytest.mark.parametrize("quant_type", FORMATS)
def test_every_category_matches_its_anchor(quant_type):
    seen = {}
    for category in fp.categories(quant_type):
        for seed in range(CASES_PER_CATEGORY):
            result = fp.run_case(fp.draw_case(1000 + seed, quant_type, category))
            assert result["status"] != "differ", (quant_type, category, seed, result)
            seen.setdefault(category, set()).add(result["status"])
    if quant_type in fp.QUANTIZED:
        assert seen["ragged_rows"] == {"refused"} and seen["nonfinite"] == {"refused"}
        assert "equal" in seen["ties"] and "equal" in seen["zero_blocks"]


def test_tie_cases_land_on_ties():
    """The "ties" category really puts values on E2M1 midpoints after scaling (MXFP4)."""
    case = fp.draw_case(3, "mxfp4", "ties")
    blocks = case["x"].reshape(-1, 32)
    exponent = np.floor(np.log2(np.abs(blocks).max(axis=1))) - 2
    scaled = np.abs(blocks) / 2.0 ** exponent[:, None]
    assert np.isin(scaled, fp.MID_E2M1).sum() >= blocks.size // 4


def test_a_wrong_rounding_rule_is_caught(monkeypatch):
    """Ties to the lower code instead of the even one: the tie cases must then differ."""
    from q4lab.reference import mx

    def ties_down(m, grid):
        grid64 = np.asarray(grid, dtype=np.float64)
        mids = (grid64[:-1] + grid64[1:]) / 2
        return np.searchsorted(mids, np.asarray(m, np.float64), side="left").astype(np.uint8)

    monkeypatch.setattr(mx, "round_to_grid", ties_down)
    statuses = {fp.run_case(fp.draw_case(s, "mxfp4", "ties"))["status"] for s in range(4)}
    assert "differ" in statuses


def test_nvfp4_with_and_without_tensor_scale():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 64)) * 3).astype(np.float32)
    for g in (None, fp.anchor_tensor_scale(x), np.float32(0.01)):
        expected = fp.anchor_quantize(x, "nvfp4", g)
        got = fp.q4lab_quantize(x, "nvfp4", g)
        assert fp.differing(expected, got) == {}, g
