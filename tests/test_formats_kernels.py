"""The C++ kernels of MXFP4, NVFP4, Q4_0, Q4_1, Q4_K, IQ4_NL (``csrc/q4_formats.h``,
``q4_formats_cpu.cpp``) against the NumPy reference and the anchors, byte for byte, on every
adversarial category of ``bench/_format_parity.py`` (the larger sweep:
``bench/sweep_formats.py --backend cpu``); plus the refusals the front end makes for them."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import q4lab
from q4lab import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _format_parity as fp  # noqa: E402

pytestmark = pytest.mark.skipif(ops.kernel_status("cpu") is not True,
                                reason=f"q4lab CPU kernels unavailable: {ops.kernel_status('cpu')}")


@pytest.mark.parametrize("quant_type", fp.QUANTIZED + fp.DEQUANT_ONLY)
def test_cpu_kernels_match_anchor_in_every_category(quant_type):
    for category in fp.categories(quant_type):
        for seed in range(5):
            case = fp.draw_case(2000 + seed, quant_type, category)
            result = fp.run_case(case, backend="cpu")
            assert result["status"] != "differ", (quant_type, category, seed, result)


@pytest.mark.parametrize("quant_type", fp.QUANTIZED)
def test_cpu_kernels_equal_reference_on_a_large_tensor(quant_type):
    w = torch.randn(96, 1536, generator=torch.Generator().manual_seed(3)) * 0.02
    w[5, :64] = 0.0
    p_ref, s_ref = q4lab.quantize_4bit(w, quant_type=quant_type, backend="reference")
    p_cpu, s_cpu = q4lab.quantize_4bit(w, quant_type=quant_type, backend="cpu")
    assert torch.equal(p_ref, p_cpu)
    if s_ref.absmax is not None:
        assert torch.equal(s_ref.absmax, s_cpu.absmax)
    if s_ref.tensor_scale is not None:
        assert float(s_ref.tensor_scale) == float(s_cpu.tensor_scale)
    out_ref = q4lab.dequantize_4bit(p_ref, s_ref, torch.float32, backend="reference")
    out_cpu = q4lab.dequantize_4bit(p_cpu, s_cpu, torch.float32, backend="cpu")
    assert torch.equal(out_ref.view(torch.int32), out_cpu.view(torch.int32))


@pytest.mark.parametrize("quant_type", fp.QUANTIZED)
def test_cpu_backend_refuses_like_the_reference(quant_type):
    w = torch.randn(4, 64)
    w[2, 7] = float("inf")
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match="Inf at flat index 135"):
            q4lab.quantize_4bit(w, quant_type=quant_type, backend=backend)
    if quant_type.startswith("q4"):
        big = torch.full((1, 32), 1e6)
        for backend in ("reference", "cpu"):
            with pytest.raises(ValueError, match="exceeds fp16's range"):
                q4lab.quantize_4bit(big, quant_type=quant_type, backend=backend)


def test_e2m1_ties_and_e4m3_scales_on_every_value():
    """Every E2M1 tie and every E4M3 scale code the NVFP4 kernel can pick, against the
    reference: blocks whose max walks through all 127 finite E4M3 values times 6."""
    from q4lab.reference import mx

    scales = mx._e4m3_values()[8:0x7F]  # the normal E4M3 values, 2^-6 ... 448
    x = np.zeros((scales.size, 16), np.float32)
    x[:, 0] = scales * np.float32(6)
    x[:, 1:8] = np.array(fp.MID_E2M1, np.float32) * scales[:, None]
    x[:, 8:15] = -x[:, 1:8]
    t = torch.from_numpy(x)
    for g in (None, "auto"):
        pr, sr = q4lab.quantize_4bit(t, quant_type="nvfp4", backend="reference", tensor_scale=g)
        pc, sc = q4lab.quantize_4bit(t, quant_type="nvfp4", backend="cpu", tensor_scale=g)
        assert torch.equal(pr, pc) and torch.equal(sr.absmax, sc.absmax)


@pytest.mark.parametrize("quant_type", fp.QUANTIZED + fp.DEQUANT_ONLY)
def test_opcheck_formats_ops(quant_type):
    """Schema, fake kernel and dispatch of formats_quantize / formats_dequantize."""
    from q4lab import _format_kernels

    _format_kernels.register_fakes()
    q = torch.ops.q4lab
    g = torch.tensor(0.01) if quant_type == "nvfp4" else None
    if quant_type in fp.QUANTIZED:
        x = torch.randn(128)
        torch.library.opcheck(q.formats_quantize.default, (x, quant_type, g))
        packed, scales = q.formats_quantize(x, quant_type, g)
    else:
        nbytes = {"q4_k": 144, "iq4_nl": 18}[quant_type]
        packed = torch.zeros(2 * nbytes, dtype=torch.uint8)
        scales = torch.empty(0, dtype=torch.uint8)
    n = 512 if quant_type == "q4_k" else (64 if quant_type == "iq4_nl" else 128)
    torch.library.opcheck(q.formats_dequantize.default, (packed, scales, quant_type, g, n))
