"""The format registry and the API for MXFP4, NVFP4, Q4_0, Q4_1, Q4_K, IQ4_NL
(``q4lab.quant_types``, ``q4lab.reference.block_formats``, ``q4lab.ops``): defaults, clear
errors, the byte layouts recorded in the state, bits per parameter, and NF4 / FP4 unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import q4lab
from q4lab import quant_types
from q4lab import reference as ref
from q4lab.reference import block_formats, gguf_quants, mx

NEW = ("mxfp4", "nvfp4", "q4_0", "q4_1")


def weights(shape=(8, 128), seed=0, dtype=torch.float32):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(
        np.float32)).to(dtype)


def test_registry_lists_every_format_once():
    assert quant_types.ALL_QUANT_TYPES == ("nf4", "fp4", "int4", "mxfp4", "nvfp4", "q4_0",
                                           "q4_1", "q4_k", "iq4_nl")
    assert {q: quant_types.get(q).default_blocksize for q in quant_types.ALL_QUANT_TYPES} == {
        "nf4": 64, "fp4": 64, "int4": 64, "mxfp4": 32, "nvfp4": 16, "q4_0": 32, "q4_1": 32,
        "q4_k": 256, "iq4_nl": 32}
    with pytest.raises(ValueError, match="unknown; use one of"):
        quant_types.get("q8_0")


@pytest.mark.parametrize("quant_type", NEW)
def test_default_blocksize_is_the_formats_own(quant_type):
    packed, state = q4lab.quantize_4bit(weights(), quant_type=quant_type)
    assert state.blocksize == quant_types.get(quant_type).default_blocksize
    assert state.layout == quant_types.get(quant_type).layout
    out = q4lab.dequantize_4bit(packed, state)
    assert out.shape == (8, 128) and out.dtype == torch.float32
    assert (out - weights()).abs().mean() < 0.12


@pytest.mark.parametrize("quant_type", NEW)
def test_mismatching_blocksize_or_double_quant_is_a_clear_error(quant_type):
    with pytest.raises(ValueError, match="fixed block of"):
        q4lab.quantize_4bit(weights(), blocksize=64, quant_type=quant_type)
    with pytest.raises(ValueError, match="no double quantization"):
        q4lab.quantize_4bit(weights(), quant_type=quant_type, double_quant=True)
    with pytest.raises(ValueError, match="not a multiple of"):
        q4lab.quantize_4bit(weights((4, 40)), quant_type=quant_type)
    bad = weights()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN at flat index 389"):
        q4lab.quantize_4bit(bad, quant_type=quant_type)


def test_nf4_and_fp4_defaults_unchanged():
    w = weights((3, 100))
    for qt in ("nf4", "fp4"):
        packed, state = q4lab.quantize_4bit(w, quant_type=qt, backend="reference")
        p2, s2 = ref.quantize_4bit(w.numpy(), 64, qt, True)
        assert state.blocksize == 64 and state.nested and state.layout == "bnb"
        assert np.array_equal(packed.numpy(), p2)
    with pytest.raises(ValueError, match="not supported"):
        ref.quantize_4bit(w.numpy(), 48, "nf4")


def test_dequantize_only_formats_refuse_to_quantize():
    for qt in ("q4_k", "iq4_nl"):
        with pytest.raises(ValueError, match="no quantizer"):
            q4lab.quantize_4bit(weights((2, 256)), quant_type=qt)


def test_layouts_recorded_in_bytes():
    """torchao: element 0 in the low nibble; GGUF: fp16 d first, byte j = q_j | q_{j+16} << 4."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1], x[0, 16] = 6.0, -1.0, 3.0
    packed, state = ref.quantize_4bit(x, quant_type="mxfp4")
    assert packed[0] == (0b1010 << 4 | 0b0111) and state.absmax[0] == 127  # 6 -> 7, -1 -> 0b1010
    blocks, _ = ref.quantize_4bit(x, quant_type="q4_0")
    d = blocks[:2].view(np.float16)[0]
    assert d == np.float16(-0.75)  # max 6 / -8
    # q_j = trunc(x_j / d + 8.5): q0 = 0 (6), q16 = 4 (3), q1 = 9 (-1), zeros 8
    assert blocks[2] == (4 << 4 | 0) and blocks[3] == (8 << 4 | 9) and blocks[4] == 0x88


def test_bits_per_param():
    assert q4lab.bits_per_param("mxfp4") == 4.25
    assert q4lab.bits_per_param("q4_0") == 4.5 and q4lab.bits_per_param("q4_1") == 5.0
    assert q4lab.bits_per_param("nvfp4", numel=2**20) == 4.5 + 32 / 2**20
    assert q4lab.bits_per_param("nvfp4", tensor_scale=False) == 4.5
    assert abs(q4lab.bits_per_param("nf4") - 4.127) < 1e-3
    assert q4lab.bits_per_param("nf4", blocksize=256, double_quant=False) == 4.125
    assert q4lab.bits_per_param("q4_k") == 4.5 and q4lab.bits_per_param("iq4_nl") == 4.5
    for qt in NEW:
        packed, state = q4lab.quantize_4bit(weights((64, 256)), quant_type=qt)
        assert q4lab.bits_per_param(state) == q4lab.bits_per_param(qt, numel=64 * 256)


def test_nvfp4_tensor_scale_options():
    w = weights()
    _, auto = q4lab.quantize_4bit(w, quant_type="nvfp4")
    assert float(auto.tensor_scale) == np.float32(w.abs().max().item()) / np.float32(2688)
    _, single = q4lab.quantize_4bit(w, quant_type="nvfp4", tensor_scale=None)
    assert single.tensor_scale is None
    _, zero = q4lab.quantize_4bit(torch.zeros(2, 16), quant_type="nvfp4")
    assert float(zero.tensor_scale) == 1.0
    with pytest.raises(ValueError, match="reciprocal is finite"):
        q4lab.quantize_4bit(w, quant_type="nvfp4", tensor_scale=0.0)
    with pytest.raises(ValueError, match="no per-tensor scale"):
        q4lab.quantize_4bit(w, quant_type="mxfp4", tensor_scale=0.5)


def test_state_validation_names_the_problem():
    packed, state = ref.quantize_4bit(weights().numpy(), quant_type="q4_0")
    with pytest.raises(ValueError, match="needs 576"):
        state.validate(packed[:-1])
    packed, state = ref.quantize_4bit(weights().numpy(), quant_type="mxfp4")
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="uint8 block scales"):
        state.validate(packed)


def test_gguf_blocks_dequantize_through_the_api():
    rng = np.random.default_rng(1)
    for qt in ("q4_k", "iq4_nl"):
        nbytes = gguf_quants.BLOCK_BYTES[qt]
        blocks = rng.integers(0, 256, (4, nbytes), dtype=np.uint8)
        blocks[:, :4] = (rng.standard_normal((4, 2)) * 0.01).astype(np.float16).view(
            np.uint8).reshape(4, 4)
        packed, state = block_formats.state_from_gguf(blocks, (2, 2 * state_cols(qt)), qt)
        out = q4lab.dequantize_4bit(torch.from_numpy(packed), state, torch.float32)
        expected = gguf_quants.DEQUANTIZE[qt](blocks).reshape(out.shape)
        assert np.array_equal(out.numpy().view(np.uint32), expected.view(np.uint32))


def state_cols(qt):
    return gguf_quants.BLOCK_VALUES[qt]


def test_mxfp4_e8m0_follows_ocp_floor_log2():
    """E8M0 = floor(log2(amax)) - 2 + 127 for normal amax, clamped at 0 below."""
    amax = np.array([1.0, 1.5, 6.0, 7.99, 8.0, 2.0**-125, 2.0**-140, 0.0, 3e38], np.float32)
    want = [125, 125, 127, 127, 128, 0, 0, 0, 252]
    assert mx.e8m0_exponent(amax).tolist() == want


def test_output_dtypes_and_bf16_input():
    w = weights(dtype=torch.bfloat16)
    for qt in NEW:
        packed, state = q4lab.quantize_4bit(w, quant_type=qt)
        assert state.dtype == "bfloat16"
        out = q4lab.dequantize_4bit(packed, state)
        assert out.dtype == torch.bfloat16
        f32 = q4lab.dequantize_4bit(packed, state, torch.float32)
        assert torch.equal(out, f32.bfloat16())


def test_block_min_max_is_numpys_reduction_order():
    """Q4_1's min / max with signed zeros: the written rule equals NumPy's own reduction here
    (the anchor calls ``blocks.min(axis=-1)``); a first-wins rule would not."""
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal((4000, 32))).astype(np.float32)
    zeros = rng.random(x.shape) < rng.random((4000, 1))
    x[zeros] = np.where(rng.random(int(zeros.sum())) < 0.5, 0.0, -0.0)
    x[::2] *= -1
    for want_max, numpy_op in ((False, x.min), (True, x.max)):
        ours = gguf_quants.block_min_max(x, want_max)
        assert np.array_equal(ours.view(np.uint32), numpy_op(axis=1).view(np.uint32))
    first_wins = np.array([min(r, key=lambda v: (v, 0)) for r in x[:200]], np.float32)
    assert not np.array_equal(first_wins.view(np.uint32), x[:200].min(axis=1).view(np.uint32))


def test_u8_code_matches_numpys_cast():
    v = np.array([-1.5, -0.5, 0.2, 14.9, 15.5, 300.7, np.inf, -np.inf, np.nan, 3e9],
                 np.float32)
    with np.errstate(invalid="ignore"):
        numpy_way = np.trunc(v).astype(np.uint8).clip(0, 15)
    assert gguf_quants.u8_code(v).tolist() == numpy_way.tolist()
