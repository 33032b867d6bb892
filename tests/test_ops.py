"""The torch front end (q4lab.ops) on the reference backend: same bytes as the NumPy reference,
bf16 handled exactly, argument checks, state/packed mismatches, and the build-failure fallback."""
import warnings

import numpy as np
import pytest
import torch

import q4lab
from q4lab import ops
from q4lab import reference as ref
from q4lab.testing import assert_bytes_equal, assert_states_equal, sample_inputs


@pytest.mark.parametrize("sample", sample_inputs(small=True), ids=repr)
def test_reference_backend_equals_numpy_reference(sample):
    dtype = getattr(torch, sample.dtype)
    w = torch.from_numpy(sample.x).to(dtype)
    packed, state = q4lab.quantize_4bit(w, sample.blocksize, sample.quant_type,
                                        sample.double_quant, backend="reference")
    packed_r, state_r = ref.quantize_4bit(sample.x, sample.blocksize, sample.quant_type,
                                          sample.double_quant, dtype=sample.dtype)
    assert packed.dtype == torch.uint8 and packed.shape == ((sample.x.size + 1) // 2,)
    assert_bytes_equal(packed_r, packed, "packed")
    assert_states_equal(state_r, state.numpy(), "state")
    out = q4lab.dequantize_4bit(packed, state, backend="reference")
    assert out.dtype == dtype and tuple(out.shape) == sample.x.shape
    expected = torch.from_numpy(ref.dequantize_4bit(packed_r, state_r, "float32")).to(dtype)
    assert_bytes_equal(expected, out, "dequantized")


def test_bfloat16_input_is_converted_exactly():
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    packed, state = q4lab.quantize_4bit(w, backend="reference")
    assert state.dtype == "bfloat16"
    packed_r, _ = ref.quantize_4bit(w.float().numpy(), dtype="bfloat16")
    assert_bytes_equal(packed_r, packed)


def test_dequantize_to_other_dtype():
    w = torch.randn(10, 33)
    packed, state = q4lab.quantize_4bit(w, 32, backend="reference")
    full = q4lab.dequantize_4bit(packed, state, backend="reference")
    half = q4lab.dequantize_4bit(packed, state, dtype=torch.float16, backend="reference")
    assert_bytes_equal(full.half(), half)


@pytest.mark.parametrize("w,err,match", [
    (torch.zeros(0), ValueError, "empty"),
    (torch.zeros(8, dtype=torch.float64), TypeError, "float64"),
    (torch.zeros(8, dtype=torch.int8), TypeError, "int8"),
    (np.zeros(8, np.float32), TypeError, "torch.Tensor"),
])
def test_bad_inputs(w, err, match):
    with pytest.raises(err, match=match):
        q4lab.quantize_4bit(w, backend="reference")


def test_nan_names_block_on_every_backend_that_runs_here():
    w = torch.zeros(4, 64)
    w[2, 5] = float("nan")
    for backend in ["reference"] + [b for b in ("cpu",) if q4lab.backends()[b] is True]:
        with pytest.raises(ValueError, match=r"NaN at flat index 133 \(block 2\)"):
            q4lab.quantize_4bit(w, 64, backend=backend)


def test_bad_arguments():
    w = torch.randn(64)
    with pytest.raises(ValueError, match="blocksize"):
        q4lab.quantize_4bit(w, 100)
    with pytest.raises(ValueError, match="quant_type"):
        q4lab.quantize_4bit(w, 64, "nf8")
    with pytest.raises(ValueError, match="backend"):
        q4lab.quantize_4bit(w, backend="tpu")
    with pytest.raises(ValueError, match="cannot run"):
        q4lab.quantize_4bit(w, backend="cuda")


def test_mismatched_state_and_packed():
    packed, state = q4lab.quantize_4bit(torch.randn(8, 64), backend="reference")
    with pytest.raises(ValueError, match="bytes but state shape"):
        q4lab.dequantize_4bit(packed[:-2], state, backend="reference")
    with pytest.raises(TypeError, match="uint8"):
        q4lab.dequantize_4bit(packed.to(torch.int16), state, backend="reference")
    _, other = q4lab.quantize_4bit(torch.randn(8, 64), 32, backend="reference")
    other.blocksize = 64
    with pytest.raises(ValueError, match="absmax values"):
        q4lab.dequantize_4bit(packed, other, backend="reference")


def test_backends_reports_every_backend():
    status = q4lab.backends()
    assert status["reference"] is True
    assert set(status) == {"reference", "cpu", "cuda"}
    for key in ("cpu", "cuda"):
        assert status[key] is True or (isinstance(status[key], str) and status[key])
    if not torch.cuda.is_available():
        assert status["cuda"] is not True


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    from q4lab import _kernels

    monkeypatch.setattr(_kernels, "available", lambda device_type: "no compiler (test)")
    monkeypatch.setattr(ops, "_warned_fallback", False)
    w = torch.randn(128)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        packed, _ = q4lab.quantize_4bit(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed2, _ = q4lab.quantize_4bit(w)  # the warning is given once
    assert_bytes_equal(packed, packed2)
    with pytest.raises(RuntimeError, match="not available"):
        q4lab.quantize_4bit(w, backend="cpu")


def test_state_repr_and_html():
    _, state = q4lab.quantize_4bit(torch.randn(4096, 64), backend="reference")
    assert "nf4" in repr(state) and "nested" in repr(state)
    html = state._repr_html_()
    assert "bits / param" in html and "4.12" in html


@pytest.mark.parametrize("dtype", ["fp16", "float64", torch.float64, torch.int8])
def test_bad_output_dtype_names_the_choices(dtype):
    packed, state = q4lab.quantize_4bit(torch.randn(70), backend="reference")
    with pytest.raises(TypeError, match="not supported for dequantized output"):
        q4lab.dequantize_4bit(packed, state, dtype=dtype)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_non_finite_offset_rejected_on_every_backend(backend):
    with pytest.raises(ValueError, match="not a finite float32"):
        q4lab.quantize_4bit(torch.randn(70), offset=float("nan"), backend=backend)


def test_nested_state_with_float_absmax_is_rejected():
    packed, state = q4lab.quantize_4bit(torch.randn(4, 64), backend="reference")
    _, plain = q4lab.quantize_4bit(torch.randn(4, 64), double_quant=False, backend="reference")
    state.absmax = plain.absmax
    with pytest.raises(ValueError, match="float32 but a nested state"):
        q4lab.dequantize_4bit(packed, state)
